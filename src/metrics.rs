//! What the service counts, served at `GET /metrics` in the Prometheus (OpenMetrics) text format.
//!
//! One [`Metrics`] per running service (not a process-wide recorder), so several services in one
//! process (the tests) keep their own counts. Labels take only fixed values: outcomes, states and
//! attempt numbers up to "6+", never URLs or IDs.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use strum::VariantArray;

use crate::domain::SubscriptionState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub outcome: &'static str,
    pub attempt: &'static str,
}

/// How often `GET /metrics` may count subscriptions in the store (a scan): at most once per this.
const STATE_COUNT_TTL: Duration = Duration::from_secs(5);

/// Declares [`Metrics`] from one list: each metric's field, type and constructor with its exposed name,
/// unit and help, so the struct, its constructor and the registry cannot drift apart.
macro_rules! metrics {
    ($($field:ident: $ty:ty = $new:expr, $name:literal $(in $unit:ident)?, $help:literal;)*) => {
        pub struct Metrics {
            registry: Registry,
            $(pub $field: $ty,)*
            /// When the subscription gauges were last counted.
            counted_at: Mutex<Option<Instant>>,
        }

        impl Metrics {
            pub fn new() -> Self {
                let mut registry = Registry::default();
                $(
                    let $field: $ty = $new;
                    metrics!(@register registry, $name, $help, $field.clone() $(, $unit)?);
                )*
                Metrics { registry, $($field,)* counted_at: Mutex::new(None) }
            }
        }
    };
    (@register $r:ident, $name:literal, $help:literal, $metric:expr) => {
        $r.register($name, $help, $metric)
    };
    (@register $r:ident, $name:literal, $help:literal, $metric:expr, $unit:ident) => {
        $r.register_with_unit($name, $help, Unit::$unit, $metric)
    };
}

metrics! {
    registered: Counter = Counter::default(), "jobhook_subscriptions_registered",
        "Subscriptions created (201)";
    finished: Family<StateLabel, Counter> = Family::default(), "jobhook_subscriptions_finished",
        "Subscriptions that reached a final state, by state (counted by the instance that ended them)";
    subscriptions: Family<StateLabel, Gauge> = Family::default(), "jobhook_subscriptions",
        "Subscriptions in the store by state (the whole store, counted at most every 5 s)";
    jobs_polling: Gauge = Gauge::default(), "jobhook_jobs_polling",
        "Upstream jobs in this instance's poll schedule";
    polls: Family<OutcomeLabel, Counter> = Family::default(), "jobhook_polls",
        "Upstream status requests by outcome: pending, terminal, 4xx, 5xx, timeout, rate_limited, unreachable, bad_answer";
    upstream_seconds: Histogram = latency(), "jobhook_upstream_request_duration" in Seconds,
        "Time of one upstream status request";
    attempts: Family<AttemptLabels, Counter> = Family::default(), "jobhook_delivery_attempts",
        "Delivery attempts by outcome (delivered, retry, failed) and attempt number (1 … 5, 6+)";
    delivery_seconds: Histogram = latency(), "jobhook_delivery_request_duration" in Seconds,
        "Time of one callback POST, from connecting to the end of the answer";
    delivery_lag_seconds: Histogram = latency(), "jobhook_delivery_lag" in Seconds,
        "From the moment a delivery became due (the job's terminal answer, a registration of a finished job, a redeliver request) to the end of its first attempt";
    deliveries_waiting: Gauge = Gauge::default(), "jobhook_deliveries_waiting",
        "Deliveries this instance holds for a first attempt or a retry (the retry backlog)";
    deliveries_paused: Gauge = Gauge::default(), "jobhook_deliveries_paused",
        "Deliveries this instance holds paused because their callback host's breaker is open";
    breakers_open: Gauge = Gauge::default(), "jobhook_callback_breakers_open",
        "Callback hosts whose breaker is open on this instance (deliveries paused, one probe per interval)";
    purged_subscriptions: Counter = Counter::default(), "jobhook_purged_subscriptions",
        "Ended subscriptions deleted by housekeeping after the retention (this instance's runs)";
    purged_attempts: Counter = Counter::default(), "jobhook_purged_attempts",
        "Delivery attempts deleted with their subscriptions by housekeeping";
    purged_jobs: Counter = Counter::default(), "jobhook_purged_jobs",
        "Job rows deleted by housekeeping once no subscription referred to them";
}

/// Buckets from 1 ms to about 65 s, doubling.
pub fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn poll(&self, outcome: &'static str, took: Duration) {
        self.polls.get_or_create(&OutcomeLabel { outcome }).inc();
        self.upstream_seconds.observe(took.as_secs_f64());
    }

    pub fn finished(&self, state: &'static str, n: u64) {
        if n > 0 {
            self.finished.get_or_create(&StateLabel { state }).inc_by(n);
        }
    }

    pub fn attempt(&self, outcome: &'static str, attempt: u32) {
        const N: [&str; 6] = ["1", "2", "3", "4", "5", "6+"];
        let attempt = N[(attempt.clamp(1, 6) - 1) as usize];
        self.attempts.get_or_create(&AttemptLabels { outcome, attempt }).inc();
    }

    /// Whether the subscription gauges are due for a recount (and, if so, marks them counted now).
    pub fn recount_due(&self) -> bool {
        let mut at = self.counted_at.lock().unwrap_or_else(|e| e.into_inner());
        if at.is_some_and(|t| t.elapsed() < STATE_COUNT_TTL) {
            return false;
        }
        *at = Some(Instant::now());
        true
    }

    pub fn set_subscription_counts(&self, counts: &[(String, i64)]) {
        for state in SubscriptionState::VARIANTS.iter().map(|s| s.as_str()) {
            let n = counts.iter().find(|(s, _)| s == state).map_or(0, |(_, n)| *n);
            self.subscriptions.get_or_create(&StateLabel { state }).set(n);
        }
    }

    /// Adds the store writer's counters and write-time histogram (call before sharing the metrics).
    pub fn attach_writer(&mut self, stats: std::sync::Arc<WriterStats>) {
        self.registry.register_with_unit(
            "jobhook_store_write_duration",
            "A write's time from queueing to its commit (group commit included)",
            Unit::Seconds,
            stats.write_seconds.clone(),
        );
        self.registry.register_collector(Box::new(WriterCollector(stats)));
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The store writer's counters, read at each scrape.
#[derive(Debug)]
struct WriterCollector(std::sync::Arc<WriterStats>);

impl prometheus_client::collector::Collector for WriterCollector {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use std::sync::atomic::Ordering::Relaxed;
        let transactions = ConstCounter::new(self.0.transactions.load(Relaxed));
        let described = encoder.encode_descriptor(
            "jobhook_store_transactions",
            "Write transactions (a group-committed batch is one)",
            None,
            transactions.metric_type(),
        )?;
        transactions.encode(described)?;
        let busy = ConstCounter::new(self.0.busy_micros.load(Relaxed) as f64 / 1e6);
        let described = encoder.encode_descriptor(
            "jobhook_store_writer_busy",
            "Time the store's writers spent running batches; its rate is their utilisation (1 = one writer always busy)",
            Some(&Unit::Seconds),
            busy.metric_type(),
        )?;
        busy.encode(described)
    }
}

/// What the store's writers did: transactions started, time spent running group-committed batches (its
/// rate is the writer's utilisation: near 1 per writer means saturated), and each group-committed
/// write's time from queueing to commit. `GET /metrics` reads them (see [`Metrics::attach_writer`]). Defined here, a leaf, and handed to the store when it opens, so the store
/// depends on metrics and never the other way round.
#[derive(Debug)]
pub struct WriterStats {
    pub transactions: std::sync::atomic::AtomicU64,
    pub busy_micros: std::sync::atomic::AtomicU64,
    pub write_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl Default for WriterStats {
    fn default() -> Self {
        WriterStats { transactions: Default::default(), busy_micros: Default::default(), write_seconds: latency() }
    }
}

impl WriterStats {
    /// Counts one batch that ran from `since` until now.
    pub fn batch(&self, since: std::time::Instant) {
        let micros = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.busy_micros.fetch_add(micros, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions_and_labels_are_bounded() {
        let m = Metrics::new();
        m.registered.inc();
        m.poll("pending", Duration::from_millis(3));
        m.attempt("retry", 1);
        m.attempt("delivered", 42);
        m.set_subscription_counts(&[("polling".into(), 7)]);
        let mut m = m;
        let stats = std::sync::Arc::new(WriterStats::default());
        stats.transactions.fetch_add(3, std::sync::atomic::Ordering::Relaxed);
        stats.busy_micros.fetch_add(1_500_000, std::sync::atomic::Ordering::Relaxed);
        m.attach_writer(stats);
        let text = m.render();
        assert!(text.contains("jobhook_store_transactions_total 3"), "{text}");
        assert!(text.contains("jobhook_store_writer_busy_seconds_total 1.5"), "{text}");
        assert!(text.contains("jobhook_store_write_duration_seconds_count 0"), "{text}");
        assert!(text.contains("jobhook_subscriptions_registered_total 1"), "{text}");
        assert!(text.contains(r#"jobhook_polls_total{outcome="pending"} 1"#), "{text}");
        assert!(text.contains("jobhook_upstream_request_duration_seconds_bucket"), "{text}");
        assert!(text.contains(r#"jobhook_delivery_attempts_total{outcome="delivered",attempt="6+"} 1"#), "{text}");
        assert!(text.contains(r#"jobhook_subscriptions{state="polling"} 7"#), "{text}");
        assert!(text.contains(r#"jobhook_subscriptions{state="cancelled"} 0"#), "{text}");
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }

    #[test]
    fn the_store_is_counted_at_most_every_few_seconds() {
        let m = Metrics::new();
        assert!(m.recount_due());
        assert!(!m.recount_due());
    }
}
