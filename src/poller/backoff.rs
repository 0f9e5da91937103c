//! How long a job waits before its next poll: pure functions of how long it has been pending, its
//! errors, the upstream's `Retry-After`, the settings and a jitter (DESIGN promise 10).

use std::time::Duration;

use crate::config::PollConfig;

/// A job pending longer than this is polled less and less often, up to `poll-max-interval`.
pub const SLOWDOWN_AFTER: Duration = Duration::from_secs(60);

/// The longest upstream `Retry-After` we honour; beyond it we would rather ask again.
pub const MAX_UPSTREAM_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How far poll times move at random, so jobs registered together spread out: later only, by up to 10%.
/// Never earlier: the upstream asks for 1–2 s between polls, and ±10% would space them 0.9 s apart.
pub const POLL_JITTER: f64 = 0.1;

/// The spacing before the next poll of a job that answered Pending and has been pending `pending_for`:
/// `poll-interval` for the first minute, then doubling every minute up to `poll-max-interval`.
/// `jitter` is in [0, 1] (a value outside is clamped to it).
pub fn pending_delay(pending_for: Duration, cfg: &PollConfig, jitter: f64) -> Duration {
    let base = if pending_for <= SLOWDOWN_AFTER {
        cfg.interval
    } else {
        let minutes_past = (pending_for - SLOWDOWN_AFTER).as_secs() / 60 + 1;
        let factor = 1u32 << minutes_past.min(16);
        cfg.interval.saturating_mul(factor).min(cfg.max_interval)
    };
    jittered(base, jitter).min(cfg.max_interval)
}

/// The spacing after `consecutive_errors` failed polls (at least 1): exponential from `poll-interval`
/// up to six times `poll-max-interval` (60 s by default), and never sooner than the upstream asked.
/// `jitter` is in [0, 1], as for [`pending_delay`].
pub fn error_delay(consecutive_errors: u32, retry_after: Option<Duration>, cfg: &PollConfig, jitter: f64) -> Duration {
    let cap = cfg.max_interval.saturating_mul(6);
    let exp = consecutive_errors.saturating_sub(1).min(20);
    let backoff = jittered(cfg.interval.saturating_mul(1 << exp).min(cap), jitter);
    match retry_after {
        Some(asked) => backoff.max(asked.min(MAX_UPSTREAM_RETRY_AFTER)),
        None => backoff,
    }
}

fn jittered(d: Duration, jitter: f64) -> Duration {
    d.mul_f64(1.0 + POLL_JITTER * jitter.clamp(0.0, 1.0))
}

pub(super) fn random_jitter() -> f64 {
    rand::random_range(0.0..=1.0)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn cfg() -> PollConfig {
        PollConfig {
            interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(10),
            max_wait: Duration::from_secs(86_400),
            not_found_grace: Duration::from_secs(60),
            max_in_flight: 8,
            max_rps: None,
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_young_pending_job_is_polled_every_interval() {
        assert_eq!(pending_delay(secs(0), &cfg(), 0.0), secs(1));
        assert_eq!(pending_delay(secs(59), &cfg(), 0.0), secs(1));
    }

    #[test]
    fn a_long_pending_job_is_polled_less_often_up_to_the_maximum() {
        assert_eq!(pending_delay(secs(61), &cfg(), 0.0), secs(2));
        assert_eq!(pending_delay(secs(121), &cfg(), 0.0), secs(4));
        assert_eq!(pending_delay(secs(181), &cfg(), 0.0), secs(8));
        assert_eq!(pending_delay(secs(241), &cfg(), 0.0), secs(10));
        assert_eq!(pending_delay(secs(86_000), &cfg(), 1.0), secs(10));
    }

    #[test]
    fn poll_jitter_only_adds_up_to_a_tenth() {
        assert_eq!(pending_delay(secs(0), &cfg(), 1.0), Duration::from_millis(1100));
        assert_eq!(pending_delay(secs(0), &cfg(), 0.0), secs(1));
    }

    /// The upstream asks for 1–2 s between polls: whatever the jitter, no spacing the poller chooses
    /// with the default settings is shorter than a second.
    #[test]
    fn with_the_default_interval_polls_of_one_job_are_never_closer_than_a_second() {
        // cfg() holds the default interval and maximum (see config's the_defaults_are_the_documented_ones).
        let defaults = cfg();
        for step in 0..=20 {
            let jitter = -1.0 + f64::from(step) / 10.0;
            for pending_for in [secs(0), secs(30), secs(59), secs(61), secs(3600)] {
                let delay = pending_delay(pending_for, &defaults, jitter);
                assert!(delay >= secs(1), "pending {pending_for:?}, jitter {jitter}: {delay:?}");
            }
            for errors in 1..=10 {
                let delay = error_delay(errors, None, &defaults, jitter);
                assert!(delay >= secs(1), "{errors} errors, jitter {jitter}: {delay:?}");
            }
        }
        let drawn = (0..1000).map(|_| random_jitter());
        assert!(drawn.clone().all(|j| (0.0..=1.0).contains(&j)), "jitter is drawn from [0, 1]");
    }

    #[test]
    fn errors_back_off_exponentially_up_to_a_minute() {
        let delays: Vec<_> = (1..=9).map(|n| error_delay(n, None, &cfg(), 0.0)).collect();
        assert_eq!(delays, vec![secs(1), secs(2), secs(4), secs(8), secs(16), secs(32), secs(60), secs(60), secs(60)]);
    }

    #[test]
    fn an_upstream_retry_after_is_waited_at_least() {
        assert_eq!(error_delay(1, Some(secs(30)), &cfg(), 0.0), secs(30));
        assert_eq!(error_delay(7, Some(secs(5)), &cfg(), 0.0), secs(60));
        assert_eq!(error_delay(1, Some(secs(999_999)), &cfg(), 0.0), MAX_UPSTREAM_RETRY_AFTER);
    }
}
