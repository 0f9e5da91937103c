//! The writes that are group-committed, as messages to a backend's writer: many of them share one
//! transaction, so they share one commit (one fsync on SQLite, one round of WAL flush on PostgreSQL).
//! The message and its answer are the same for both backends; each backend runs them its own way.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::*;

/// The most writes one transaction carries.
pub(super) const MAX_BATCH: usize = 1024;

/// A claim is taken this much before the stored expiry on this process's clock, so the two clocks'
/// tiny drift over a claim's life never lets us believe we hold one that has lapsed.
pub(super) const CLAIM_SAFETY: Duration = Duration::from_secs(1);

/// A write that is group-committed: many of them share one transaction, so they share one fsync.
pub(super) enum Write {
    Register {
        registration: Box<Registration>,
        reply: oneshot::Sender<Result<Registered>>,
    },
    Complete {
        end: JobEnd,
        claim: ClaimFor,
        reply: oneshot::Sender<Result<Vec<DeliveryTask>>>,
    },
    Claim {
        id: SubscriptionId,
        partition: i64,
        series: u32,
        now: Timestamp,
        claim: ClaimFor,
        reply: oneshot::Sender<Result<Claim>>,
    },
    Attempt {
        record: AttemptRecord,
        result: AttemptResult,
        now: Timestamp,
        reply: oneshot::Sender<Result<bool>>,
    },
    Observe {
        observation: Observation,
        reply: oneshot::Sender<Result<()>>,
    },
}

/// Who claims a delivery, and for how long (milliseconds).
#[derive(Debug, Clone)]
pub(super) struct ClaimFor {
    pub(super) by: Arc<str>,
    pub(super) ms: i64,
    /// The claim's end on this process's clock, a little before the stored one.
    pub(super) held_until: std::time::Instant,
}

/// What one write produced, until its transaction has committed. (Short-lived, at most a batch of them:
/// the size difference between variants does not matter.)
#[allow(clippy::large_enum_variant)]
pub(super) enum Done {
    Register(Result<Registered>),
    Complete(Result<Vec<DeliveryTask>>),
    Claim(Result<Claim>),
    Attempt(Result<bool>),
    Observe(Result<()>),
}

impl ClaimFor {
    /// A claim by instance `by` for `d`, starting now.
    pub(super) fn new(by: &Arc<str>, d: Duration) -> Self {
        ClaimFor {
            by: by.clone(),
            ms: i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            held_until: std::time::Instant::now() + d.saturating_sub(CLAIM_SAFETY),
        }
    }
}

impl Write {
    /// A registration, and the receiver of its answer.
    pub(super) fn register(registration: Registration) -> (Self, oneshot::Receiver<Result<Registered>>) {
        let (reply, answer) = oneshot::channel();
        (Write::Register { registration: Box::new(registration), reply }, answer)
    }

    /// Jobs by key, then subscriptions by ID. A canonical UUID's text sorts as the UUID does, so the
    /// AetherForge jobs keep the order they always locked in.
    pub(super) fn lock_order(&self) -> (u8, std::borrow::Cow<'_, str>) {
        match self {
            Write::Register { registration, .. } => (0, registration.job_id.key().into()),
            Write::Complete { end, .. } => (0, end.job_id.key().into()),
            Write::Observe { observation, .. } => (0, observation.job_id.key().into()),
            Write::Attempt { record, .. } => (1, record.subscription_id.to_string().into()),
            Write::Claim { id, .. } => (1, id.to_string().into()),
        }
    }

    /// The partition of the job the write is about.
    pub(super) fn partition(&self) -> i64 {
        match self {
            Write::Register { registration, .. } => registration.job_id.partition(),
            Write::Complete { end, .. } => end.job_id.partition(),
            Write::Observe { observation, .. } => observation.job_id.partition(),
            Write::Attempt { record, .. } => record.partition,
            Write::Claim { partition, .. } => *partition,
        }
    }

    /// Sends the result to the caller (who may have gone: then nobody waits for it).
    pub(super) fn answer(self, done: Done) {
        match (self, done) {
            (Write::Register { reply, .. }, Done::Register(r)) => drop(reply.send(r)),
            (Write::Complete { reply, .. }, Done::Complete(r)) => drop(reply.send(r)),
            (Write::Claim { reply, .. }, Done::Claim(r)) => drop(reply.send(r)),
            (Write::Attempt { reply, .. }, Done::Attempt(r)) => drop(reply.send(r)),
            (Write::Observe { reply, .. }, Done::Observe(r)) => drop(reply.send(r)),
            (write, _) => write.answer_with(StoreError::Corrupt("a write got another write's result".into())),
        }
    }

    pub(super) fn answer_with(self, e: StoreError) {
        match self {
            Write::Register { reply, .. } => drop(reply.send(Err(e))),
            Write::Complete { reply, .. } => drop(reply.send(Err(e))),
            Write::Claim { reply, .. } => drop(reply.send(Err(e))),
            Write::Attempt { reply, .. } => drop(reply.send(Err(e))),
            Write::Observe { reply, .. } => drop(reply.send(Err(e))),
        }
    }
}

impl Done {
    /// The write's own error, if it failed; otherwise the result itself.
    pub(super) fn checked(self) -> std::result::Result<Done, StoreError> {
        match self {
            Done::Register(Err(e))
            | Done::Complete(Err(e))
            | Done::Claim(Err(e))
            | Done::Attempt(Err(e))
            | Done::Observe(Err(e)) => Err(e),
            done => Ok(done),
        }
    }
}

impl Write {
    /// This write's result kind, carrying an error.
    pub(super) fn failed(&self, e: StoreError) -> Done {
        match self {
            Write::Register { .. } => Done::Register(Err(e)),
            Write::Complete { .. } => Done::Complete(Err(e)),
            Write::Claim { .. } => Done::Claim(Err(e)),
            Write::Attempt { .. } => Done::Attempt(Err(e)),
            Write::Observe { .. } => Done::Observe(Err(e)),
        }
    }
}

/// Why a claim was not taken: another holder (until when), or the delivery is over.
pub(super) fn claim_refused(row: Option<(String, i64, Option<Timestamp>)>, series: u32, now: Timestamp) -> Claim {
    match row {
        Some((state, s, until)) if state == "delivering" && s == i64::from(series) => {
            // No claim now: its holder released it between our UPDATE and this read (PostgreSQL reads
            // each statement at its own snapshot). Still waiting: try again at once, not give it up.
            Claim::Busy(until.unwrap_or(now).max(now))
        }
        _ => Claim::Gone,
    }
}
