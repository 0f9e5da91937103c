//! Entries kept for a span of time: keys seen in the last few seconds (to tell a late message from a
//! live one) and values read at most once per span (a cache).
//!
//! One small type of ours rather than a cache crate (moka): both uses are a map behind a lock the
//! caller already holds, with one fixed span, and need no eviction policy beyond "older than the span".

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

// tokio's clock, so tests can pause it; outside a runtime it is the standard one.
use tokio::time::Instant;

/// A map whose entries count for `keep` after they were inserted. Expired entries are dropped on an
/// insert at most once per `keep`, so memory is bounded by what arrives in two such spans.
pub struct Expiring<K, V> {
    entries: HashMap<K, (Instant, V)>,
    keep: Duration,
    pruned: Instant,
}

impl<K: Hash + Eq, V> Expiring<K, V> {
    pub fn new(keep: Duration) -> Self {
        Expiring { entries: HashMap::new(), keep, pruned: Instant::now() }
    }

    pub fn insert(&mut self, key: K, value: V) {
        let now = Instant::now();
        if now.duration_since(self.pruned) > self.keep {
            let keep = self.keep;
            self.entries.retain(|_, (at, _)| now.duration_since(*at) < keep);
            self.pruned = now;
        }
        self.entries.insert(key, (now, value));
    }

    /// The value, if it was inserted less than `keep` ago.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key).filter(|(at, _)| at.elapsed() < self.keep).map(|(_, value)| value)
    }

    /// Takes the entry out, fresh or not yet pruned.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.entries.remove(key).map(|(_, value)| value)
    }

    /// Whether the key is held (fresh, or expired and not yet pruned).
    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }
}

/// Keys seen in the last [`Recently::KEEP`] (or a little longer, until the next prune).
pub struct Recently<K>(Expiring<K, ()>);

impl<K: Hash + Eq> Recently<K> {
    /// Messages wait in a channel for milliseconds; one older than this is not expected.
    pub const KEEP: Duration = Duration::from_secs(10);

    pub fn new() -> Self {
        Recently(Expiring::new(Self::KEEP))
    }

    pub fn record(&mut self, key: K) {
        self.0.insert(key, ());
    }

    /// Whether the key was recorded recently; it is forgotten here.
    pub fn take(&mut self, key: &K) -> bool {
        self.0.remove(key).is_some()
    }

    /// Whether the key was recorded recently; it is kept.
    pub fn contains(&self, key: &K) -> bool {
        self.0.contains(key)
    }
}

impl<K: Hash + Eq> Default for Recently<K> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_value_counts_for_its_span_and_is_pruned_after_two() {
        let mut map = Expiring::new(Duration::from_secs(1));
        map.insert("a", 1);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(map.get(&"a"), Some(&1));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(map.get(&"a"), None, "stale after its span");
        assert!(map.contains(&"a"), "kept until the next prune");
        tokio::time::advance(Duration::from_secs(1)).await;
        map.insert("b", 2);
        assert!(!map.contains(&"a"), "an insert prunes what expired");
        assert_eq!(map.get(&"b"), Some(&2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_recorded_key_is_taken_once() {
        let mut recently = Recently::new();
        recently.record(7);
        assert!(recently.contains(&7));
        assert!(recently.take(&7));
        assert!(!recently.take(&7));
    }
}
