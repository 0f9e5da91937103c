//! When to try a delivery again: a pure function of (attempts made, schedule, Retry-After, jitter).

use std::time::Duration;

/// The longest `Retry-After` from a receiver we honour; a longer one is cut to this, so a receiver cannot
/// park a delivery for days.
pub const MAX_RECEIVER_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How far each scheduled delay is moved at random, both ways (±20%), so that retries to one host that
/// failed together do not return together.
pub const JITTER: f64 = 0.2;

/// The delay before the next attempt after `attempts_made` attempts have failed, or `None` when the
/// schedule is exhausted. `jitter` is a number in [-1, 1] (random in production, fixed in tests);
/// `retry_after` is what the receiver asked for (429/503), honoured up to [`MAX_RECEIVER_RETRY_AFTER`].
pub fn next_delay(
    schedule: &[Duration],
    attempts_made: u32,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Option<Duration> {
    let index = usize::try_from(attempts_made).ok()?.checked_sub(1)?;
    let base = *schedule.get(index)?;
    let jittered = base.mul_f64((1.0 + JITTER * jitter.clamp(-1.0, 1.0)).max(0.0));
    Some(match retry_after {
        Some(asked) => jittered.max(asked.min(MAX_RECEIVER_RETRY_AFTER)),
        None => jittered,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn the_nth_failure_waits_the_nth_scheduled_delay() {
        let schedule = [secs(5), secs(300), secs(1800)];
        assert_eq!(next_delay(&schedule, 1, None, 0.0), Some(secs(5)));
        assert_eq!(next_delay(&schedule, 2, None, 0.0), Some(secs(300)));
        assert_eq!(next_delay(&schedule, 3, None, 0.0), Some(secs(1800)));
    }

    #[test]
    fn the_schedule_runs_out_after_its_last_delay() {
        let schedule = [secs(5), secs(300)];
        assert_eq!(next_delay(&schedule, 3, None, 0.0), None);
        assert_eq!(next_delay(&[], 1, None, 0.0), None);
    }

    #[test]
    fn jitter_moves_a_delay_by_at_most_twenty_percent() {
        let schedule = [secs(100)];
        assert_eq!(next_delay(&schedule, 1, None, 1.0), Some(secs(120)));
        assert_eq!(next_delay(&schedule, 1, None, -1.0), Some(secs(80)));
        assert_eq!(next_delay(&schedule, 1, None, 7.0), Some(secs(120)));
    }

    #[test]
    fn a_receivers_retry_after_is_honoured_within_bounds() {
        let schedule = [secs(5)];
        assert_eq!(next_delay(&schedule, 1, Some(secs(60)), 0.0), Some(secs(60)));
        assert_eq!(next_delay(&schedule, 1, Some(secs(1)), 0.0), Some(secs(5)));
        assert_eq!(next_delay(&schedule, 1, Some(secs(86_400)), 0.0), Some(MAX_RECEIVER_RETRY_AFTER));
    }
}
