//! One keyed delay schedule with running slots and a graceful drain: the loop both workers share.
//!
//! Each key (a job to poll, a subscription to deliver) is either *queued* until a due time or
//! *running* (its work spawned on a [`JoinSet`]), never both, so one key never has two pieces of work
//! in flight (DESIGN promise 4). Queued items wait in a timer wheel ([`DelayQueue`]), not a task each.
//! The worker decides what a due item becomes and what a finished one leaves behind; the schedule keeps
//! the bookkeeping: which key a finished task was, the cap on running work, the drain at shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::time::Duration;

use futures_util::StreamExt;
use slab::Slab;
use tokio::task::{JoinError, JoinSet};
use tokio_util::time::{DelayQueue, delay_queue};

/// A key's place in the schedule. Small (16 bytes for the poller), because the map holding it has up to
/// twice as many buckets as keys; a queued item itself lives once, in [`Schedule::items`].
enum Slot<F> {
    /// Its entry in the timer wheel, and its item's index in `items`.
    Queued(delay_queue::Key, u32),
    /// Its work runs; `F` is what the worker notes about it meanwhile (a cancellation, a newer item).
    Running(F),
}

/// A key's place, for the worker to change.
pub enum Entry<'a, T, F> {
    Queued(&'a mut T),
    Running(&'a mut F),
}

/// What [`Schedule::next`] saw.
pub enum Event<K, T, F, R> {
    /// `key`'s item fell due; it has left the schedule (start its work, or drop it).
    Due(K, T),
    /// `key`'s work ended, with what the worker noted about it while it ran; the key has left the
    /// schedule. A panic in the work is an `Err`.
    Done(K, F, Result<(T, R), JoinError>),
}

/// Items of type `T` under keys `K`, queued until due or running; `F` is noted on running work and `R`
/// is what the work returns besides its item.
pub struct Schedule<K, T, F, R> {
    queue: DelayQueue<K>,
    slots: HashMap<K, Slot<F>>,
    /// The queued items, packed: a slab grows to the next power of two of the queued count, where the
    /// map would hold each item in every one of its buckets, used or not.
    items: Slab<T>,
    running: JoinSet<(T, R)>,
    /// Which key each spawned task serves, to find it again when the task ends (even by a panic).
    tasks: HashMap<tokio::task::Id, K>,
    max_running: usize,
}

impl<K, T, F, R> Schedule<K, T, F, R>
where
    K: Hash + Eq + Clone + Send + 'static,
    T: Send + 'static,
    R: Send + 'static,
{
    /// A schedule that runs at most `max_running` pieces of work at once; a due item waits beyond that.
    pub fn new(max_running: usize) -> Self {
        Schedule {
            queue: DelayQueue::new(),
            slots: HashMap::new(),
            items: Slab::new(),
            running: JoinSet::new(),
            tasks: HashMap::new(),
            max_running: max_running.max(1),
        }
    }

    /// Queues `item` to fall due after `after`, if `key` is not in the schedule; otherwise `item` is
    /// dropped and `false` returned.
    pub fn insert(&mut self, key: K, item: T, after: Duration) -> bool {
        if self.slots.contains_key(&key) {
            return false;
        }
        let at = self.queue.insert(key.clone(), after);
        // The timer wheel holds fewer than 2^30 entries (it panics beyond), and each queued item has one.
        let index = u32::try_from(self.items.insert(item)).expect("fewer queued items than the timer wheel's cap");
        self.slots.insert(key, Slot::Queued(at, index));
        true
    }

    /// Where `key` stands, if it is in the schedule.
    pub fn get_mut(&mut self, key: &K) -> Option<Entry<'_, T, F>> {
        match self.slots.get_mut(key)? {
            Slot::Queued(_, index) => Some(Entry::Queued(&mut self.items[*index as usize])),
            Slot::Running(noted) => Some(Entry::Running(noted)),
        }
    }

    /// Moves a queued key's due time to `after` from now; a running or absent key is left alone.
    pub fn reschedule(&mut self, key: &K, after: Duration) {
        if let Some(Slot::Queued(at, _)) = self.slots.get(key) {
            self.queue.reset(at, after);
        }
    }

    /// Takes a queued key out of the schedule; a running one stays (its worker decides when it ends).
    pub fn remove_queued(&mut self, key: &K) -> Option<T> {
        match self.slots.remove(key)? {
            Slot::Queued(at, index) => {
                self.queue.remove(&at);
                Some(self.items.remove(index as usize))
            }
            running => {
                self.slots.insert(key.clone(), running);
                None
            }
        }
    }

    /// Runs `work` for a key that just fell due, noting `noted` on it until it ends.
    pub fn start(&mut self, key: K, noted: F, work: impl Future<Output = (T, R)> + Send + 'static) {
        let task = self.running.spawn(work);
        self.tasks.insert(task.id(), key.clone());
        self.slots.insert(key, Slot::Running(noted));
    }

    /// How many keys are queued or running.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The next item to fall due (while fewer than the cap run) or the next work to end; pending while
    /// there is neither. Cancel-safe: dropped before it returns, it loses nothing.
    pub async fn next(&mut self) -> Event<K, T, F, R> {
        loop {
            let can_start = self.running.len() < self.max_running;
            tokio::select! {
                Some(due) = self.queue.next(), if can_start => {
                    let key = due.into_inner();
                    // A key leaves the wheel only with its slot, so a due key is always queued here.
                    if let Some(Slot::Queued(_, index)) = self.slots.remove(&key) {
                        return Event::Due(key, self.items.remove(index as usize));
                    }
                }
                Some(done) = self.running.join_next_with_id() => {
                    let (id, result) = match done {
                        Ok((id, result)) => (id, Ok(result)),
                        Err(e) => (e.id(), Err(e)),
                    };
                    let Some(key) = self.tasks.remove(&id) else { continue };
                    if let Some(Slot::Running(noted)) = self.slots.remove(&key) {
                        return Event::Done(key, noted, result);
                    }
                }
                else => std::future::pending::<()>().await,
            }
        }
    }

    /// At shutdown: forgets what is queued and waits for running work up to `grace`, then aborts the
    /// rest. Returns how many were running.
    pub async fn drain(mut self, grace: Duration) -> usize {
        let running = self.running.len();
        if running > 0 {
            let _ = tokio::time::timeout(grace, async { while self.running.join_next().await.is_some() {} }).await;
            self.running.abort_all();
        }
        running
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Test = Schedule<u32, &'static str, bool, ()>;

    #[tokio::test(start_paused = true)]
    async fn items_fall_due_in_order_of_their_time() {
        let mut schedule = Test::new(8);
        assert!(schedule.insert(2, "later", Duration::from_secs(2)));
        assert!(schedule.insert(1, "sooner", Duration::from_secs(1)));
        assert!(!schedule.insert(1, "again", Duration::ZERO), "a key is scheduled once");
        let started = tokio::time::Instant::now();
        let Event::Due(key, item) = schedule.next().await else { panic!("nothing runs") };
        assert_eq!((key, item), (1, "sooner"));
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        schedule.reschedule(&2, Duration::from_secs(5));
        let Event::Due(key, _) = schedule.next().await else { panic!("nothing runs") };
        assert_eq!(key, 2);
        assert_eq!(started.elapsed(), Duration::from_secs(6));
        assert!(schedule.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn running_work_is_found_again_by_its_key_with_what_was_noted() {
        let mut schedule = Test::new(1);
        schedule.insert(1, "one", Duration::ZERO);
        schedule.insert(2, "two", Duration::ZERO);
        let Event::Due(key, item) = schedule.next().await else { panic!("nothing runs") };
        schedule.start(key, false, async move { (item, ()) });
        if let Some(Entry::Running(noted)) = schedule.get_mut(&key) {
            *noted = true;
        }
        assert!(schedule.remove_queued(&key).is_none(), "running work is not removed");
        // At the cap, the other due item waits for the running one to end.
        let Event::Done(done, noted, result) = schedule.next().await else { panic!("over the cap") };
        assert_eq!((done, noted, result.unwrap().0), (key, true, item));
        let Event::Due(other, _) = schedule.next().await else { panic!("nothing left") };
        assert_ne!(other, key);
    }

    #[tokio::test(start_paused = true)]
    async fn each_key_keeps_its_own_item_as_places_are_reused() {
        let mut schedule = Test::new(8);
        schedule.insert(1, "one", Duration::from_secs(1));
        schedule.insert(2, "two", Duration::from_secs(2));
        assert_eq!(schedule.remove_queued(&1), Some("one"));
        schedule.insert(3, "three", Duration::from_secs(3));
        if let Some(Entry::Queued(item)) = schedule.get_mut(&2) {
            *item = "two, changed";
        }
        let Event::Due(key, item) = schedule.next().await else { panic!("nothing runs") };
        assert_eq!((key, item), (2, "two, changed"));
        let Event::Due(key, item) = schedule.next().await else { panic!("nothing runs") };
        assert_eq!((key, item), (3, "three"));
        assert!(schedule.is_empty());
    }

    /// The map from key to slot has up to twice as many buckets as keys (a million pending jobs).
    #[test]
    fn a_slot_stays_within_16_bytes() {
        assert!(std::mem::size_of::<Slot<bool>>() <= 16, "{} bytes", std::mem::size_of::<Slot<bool>>());
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_waits_for_running_work_up_to_the_grace_period() {
        let mut schedule = Test::new(8);
        schedule.insert(1, "slow", Duration::ZERO);
        let Event::Due(key, item) = schedule.next().await else { panic!("nothing runs") };
        schedule.start(key, false, async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            (item, ())
        });
        let started = tokio::time::Instant::now();
        assert_eq!(schedule.drain(Duration::from_secs(5)).await, 1);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }
}
