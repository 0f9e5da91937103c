//! The delivery loop: the shared schedule, keyed by subscription, around [`attempt`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use tokio::task::JoinError;
use tokio_util::sync::CancellationToken;

use super::{Breaker, DeliveryContext, DeliveryOutcome, DispatcherInbox, DispatcherMsg, attempt};
use crate::domain::{SubscriptionId, Timestamp};
use crate::schedule::{Entry, Event, Schedule};
use crate::store::DeliveryTask;

/// What the dispatcher notes on a running attempt of `series`. `cancelled`: drop the delivery when it
/// returns. `then`: a newer series (a redelivery) that arrived meanwhile, to queue when it returns.
struct InFlight {
    series: u32,
    cancelled: bool,
    then: Option<DeliveryTask>,
}

/// The dispatcher's schedule: one delivery per subscription, queued or being attempted. No cap on
/// running attempts here: each attempt waits for its own tenant, host and overall slots.
type Deliveries = Schedule<SubscriptionId, DeliveryTask, InFlight, DeliveryOutcome>;

/// The queued deliveries that wait for their host's breaker to close, by subscription: their host.
type Paused = HashMap<SubscriptionId, String>;

/// Makes the paused deliveries to `host` (to every host whose breaker is closed, when `None`) due now.
/// They then wait for their host's slots, so a host that comes back is not flooded.
fn resume(ctx: &DeliveryContext, deliveries: &mut Deliveries, paused: &mut Paused, host: Option<&str>) {
    paused.retain(|id, paused_host| {
        let closed = host.map_or_else(|| !ctx.breaker.is_open(paused_host), |h| h == paused_host.as_str());
        if closed && let Some(Entry::Queued(task)) = deliveries.get_mut(id) {
            task.due_at = Timestamp::now();
            deliveries.reschedule(id, Duration::ZERO);
        }
        !closed
    });
}

/// Queues a delivery unless it is already known (queued or being attempted): the store holds one
/// delivery per subscription. A known delivery queued for later is moved earlier by one due sooner.
fn enqueue(deliveries: &mut Deliveries, task: DeliveryTask) {
    let id = task.subscription_id;
    match deliveries.get_mut(&id) {
        None => {
            let due_in = delay_until(task.due_at);
            deliveries.insert(id, task, due_in);
        }
        // A newer series replaces a queued older one. The same series is already queued; it moves
        // earlier if this one is due sooner (a "retry now" from the API), never later (a notice that
        // arrives after the attempt was rescheduled must not undo it).
        Some(Entry::Queued(queued)) => {
            if task.series > queued.series {
                let due_in = delay_until(task.due_at);
                *queued = task;
                deliveries.reschedule(&id, due_in);
            } else if task.series == queued.series && task.due_at < queued.due_at {
                queued.due_at = task.due_at;
                deliveries.reschedule(&id, delay_until(task.due_at));
            }
        }
        // The same series again (say, from this instance's API and from a notice) is already being
        // attempted; only a newer one waits its turn.
        Some(Entry::Running(InFlight { series, cancelled, then })) => {
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

fn delay_until(due_at: Timestamp) -> Duration {
    due_at.duration_since(Timestamp::now())
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
    let mut closed = ctx.breaker.subscribe();
    let mut paused = Paused::new();
    let mut deliveries = Deliveries::new(usize::MAX);
    let initial_count = initial.len();
    for task in initial {
        enqueue(&mut deliveries, task);
    }
    tracing::info!(deliveries = initial_count, "dispatcher started");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(msg) = rx.recv() => on_message(&ctx, &mut deliveries, &mut paused, msg),
            host = closed.recv() => match host {
                Ok(host) => resume(&ctx, &mut deliveries, &mut paused, Some(&host)),
                // Missed some: resume every paused delivery whose host is closed. (Never closed: the
                // breaker, which holds the sender, lives in `ctx`.)
                Err(broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed) => {
                    resume(&ctx, &mut deliveries, &mut paused, None)
                }
            },
            event = deliveries.next() => match event {
                // Its partition went to another instance: the delivery is theirs now.
                Event::Due(_, task) if !ours(&ctx, &task) => {}
                Event::Due(id, mut task) => {
                    paused.remove(&id);
                    let ctx = ctx.clone();
                    let noted = InFlight { series: task.series, cancelled: false, then: None };
                    deliveries.start(id, noted, async move {
                        let outcome = attempt(&ctx, &mut task).await;
                        (task, outcome)
                    });
                }
                Event::Done(id, noted, result) => on_done(&ctx, &mut deliveries, &mut paused, (id, noted), result),
            },
        }
        ctx.metrics.deliveries_waiting.set(i64::try_from(deliveries.len()).unwrap_or(i64::MAX));
        ctx.metrics.deliveries_paused.set(i64::try_from(paused.len()).unwrap_or(i64::MAX));
    }
    let waited = deliveries.drain(grace).await;
    tracing::info!(in_flight = waited, "dispatcher stopped");
}

fn on_message(ctx: &DeliveryContext, deliveries: &mut Deliveries, paused: &mut Paused, msg: DispatcherMsg) {
    match msg {
        // Another instance delivers the partitions we do not hold. A delivery whose subscription was
        // cancelled meanwhile is dropped when its claim is refused (a cancellation never commits while
        // a claim is held).
        DispatcherMsg::Deliver(tasks) => {
            for task in tasks.into_iter().filter(|t| ours(ctx, t)) {
                enqueue(deliveries, task);
            }
        }
        DispatcherMsg::Cancel(id) => {
            paused.remove(&id);
            if let Some(Entry::Running(InFlight { cancelled, then, .. })) = deliveries.get_mut(&id) {
                *cancelled = true;
                *then = None;
            } else {
                deliveries.remove_queued(&id);
            }
        }
    }
}

fn on_done(
    ctx: &DeliveryContext,
    deliveries: &mut Deliveries,
    paused: &mut Paused,
    (id, noted): (SubscriptionId, InFlight),
    result: Result<(DeliveryTask, DeliveryOutcome), JoinError>,
) {
    if let Some(newer) = noted.then {
        enqueue(deliveries, newer);
    }
    match result {
        Ok((mut task, outcome)) => {
            if let Some(due_at) = outcome.next_due()
                && !noted.cancelled
                && ctx.ownership.owns(task.partition)
            {
                task.due_at = due_at;
                if let (DeliveryOutcome::Paused(_), Some(host)) = (outcome, Breaker::host_of(&task.callback_url)) {
                    // The breaker may have closed while this attempt asked it: then it is due now.
                    if ctx.breaker.is_open(&host) {
                        paused.insert(id, host);
                    } else {
                        task.due_at = Timestamp::now();
                    }
                }
                enqueue(deliveries, task);
            }
        }
        // A bug, not a receiver's fault: the delivery stays in the store and resumes at the next start;
        // say so loudly.
        Err(e) => tracing::error!(subscription_id = %id, error = %e, "delivery attempt failed unexpectedly"),
    }
}
