//! Keys seen in the last few seconds: for telling a late message from a live one.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Remembers keys for [`Recently::KEEP`]; memory is bounded by what arrives in two such spans.
pub struct Recently<K> {
    seen: HashMap<K, Instant>,
    pruned: Instant,
}

impl<K: Hash + Eq> Recently<K> {
    /// Messages wait in a channel for milliseconds; one older than this is not expected.
    pub const KEEP: Duration = Duration::from_secs(10);

    pub fn new() -> Self {
        Recently { seen: HashMap::new(), pruned: Instant::now() }
    }

    pub fn record(&mut self, key: K) {
        let now = Instant::now();
        if now.duration_since(self.pruned) > Self::KEEP {
            self.seen.retain(|_, at| now.duration_since(*at) < Self::KEEP);
            self.pruned = now;
        }
        self.seen.insert(key, now);
    }

    /// Whether the key was recorded within the last [`Recently::KEEP`] (or a little longer, until the
    /// next prune); it is forgotten here.
    pub fn take(&mut self, key: &K) -> bool {
        self.seen.remove(key).is_some()
    }

    /// Whether the key was recorded recently; it is kept.
    pub fn contains(&self, key: &K) -> bool {
        self.seen.contains_key(key)
    }
}

impl<K: Hash + Eq> Default for Recently<K> {
    fn default() -> Self {
        Self::new()
    }
}
