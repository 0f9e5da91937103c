//! Partitions and ownership deadlines: which partitions this instance may work on, until when.
//!
//! A leaf shared by the poller, the dispatcher and the lease loop (cluster.rs): the lease loop sets the
//! mask, the workers read it before each poll and delivery.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

pub use crate::domain::PARTITIONS;

/// Which partitions this instance works on: bit `p` set = partition `p` is ours, until a deadline.
///
/// The deadline is a safety margin before our leases lapse, moved on by every successful renewal. An
/// instance that stalls (SIGSTOP, a hung lease query, an overloaded host) stops working on its
/// partitions by itself when it resumes, before the lease loop has had a chance to notice, so it never
/// works beside the instance that took them over.
#[derive(Debug)]
pub struct Ownership {
    pub(crate) mask: AtomicU64,
    /// Milliseconds since [`EPOCH`] (a monotonic clock) until which `mask` holds.
    valid_until: AtomicU64,
    /// Polls under way, per partition. A partition we give up is released only once its polls have
    /// ended, so its next owner never polls a job beside us (DESIGN promise 4). (Deliveries need no
    /// count: each attempt holds a claim in the store.)
    polls: [AtomicU32; PARTITIONS as usize],
}

/// A poll under way in a partition; counted until dropped (see [`Ownership::poll_started`]).
pub struct PollUnderWay {
    ownership: Arc<Ownership>,
    partition: usize,
}

impl Drop for PollUnderWay {
    fn drop(&mut self) {
        self.ownership.polls[self.partition].fetch_sub(1, Ordering::AcqRel);
    }
}

static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

fn monotonic_ms(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(*EPOCH).as_millis()).unwrap_or(u64::MAX)
}

impl Ownership {
    /// Every partition, for ever: the single instance on SQLite.
    pub fn all() -> Self {
        Ownership {
            mask: AtomicU64::new(u64::MAX),
            valid_until: AtomicU64::new(u64::MAX),
            polls: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }

    /// No partition yet: an instance on PostgreSQL before its first leases.
    pub fn none() -> Self {
        Ownership {
            mask: AtomicU64::new(0),
            valid_until: AtomicU64::new(0),
            polls: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }

    /// Counts a poll of a job in `partition` until the returned value is dropped; `None` (nothing
    /// counted) when the partition is not ours. Counted before the ownership check, so a release that
    /// sees no poll under way after taking the partition away cannot miss one starting.
    pub fn poll_started(self: &Arc<Self>, partition: i64) -> Option<PollUnderWay> {
        let index = usize::try_from(partition).ok().filter(|p| *p < PARTITIONS as usize)?;
        self.polls[index].fetch_add(1, Ordering::AcqRel);
        let under_way = PollUnderWay { ownership: self.clone(), partition: index };
        self.owns(partition).then_some(under_way)
    }

    /// Whether any poll is under way in `partitions` (a mask).
    pub(crate) fn polls_under_way(&self, partitions: u64) -> bool {
        (0..PARTITIONS as usize).any(|p| partitions & (1 << p) != 0 && self.polls[p].load(Ordering::Acquire) > 0)
    }

    pub fn owns(&self, partition: i64) -> bool {
        (0..i64::from(PARTITIONS)).contains(&partition) && self.mask() & (1 << partition) != 0
    }

    /// The partitions we may work on now: none once the deadline has passed.
    pub fn mask(&self) -> u64 {
        let until = self.valid_until.load(Ordering::Acquire);
        // `all()` never expires: no clock read on SQLite's hot path.
        if until == u64::MAX || monotonic_ms(Instant::now()) < until { self.mask.load(Ordering::Acquire) } else { 0 }
    }

    pub(crate) fn set(&self, mask: u64) {
        self.mask.store(mask, Ordering::Release);
    }

    /// Our leases were renewed: the mask holds until `until`.
    pub(crate) fn valid_until(&self, until: Instant) {
        self.valid_until.store(monotonic_ms(until), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn ownership_is_a_mask_of_partitions_until_its_deadline() {
        let o = Ownership::none();
        assert!(!o.owns(3));
        o.set(1 << 3 | 1 << 63);
        assert!(!o.owns(3), "no renewal yet: nothing is ours");
        o.valid_until(Instant::now() + Duration::from_secs(60));
        assert!(o.owns(3) && o.owns(63) && !o.owns(4) && !o.owns(64) && !o.owns(-1));
        // A stalled instance that resumes after its deadline works on nothing until it renews.
        o.valid_until(Instant::now() - Duration::from_millis(1));
        assert!(!o.owns(3) && o.mask() == 0);
        assert!(Ownership::all().owns(0));
    }
}
