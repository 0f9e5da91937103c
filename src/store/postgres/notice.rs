//! Notices between instances: what one instance tells the others through LISTEN/NOTIFY, sent in the
//! same transaction as the write it is about (so it is delivered when that commits, or never). The wire
//! form is written and read here only: `poll <job_id>`, `deliver <subscription_id> <partition>`,
//! `cancel <subscription_id> <job_id>`.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::domain::{JobId, SubscriptionId};
use crate::store::Heard;

/// The PostgreSQL channel that carries work between instances.
pub const CHANNEL: &str = "jobhook";

/// Work another instance may own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A job got its first polling subscription.
    Poll(JobId),
    /// A delivery (of this partition) is due.
    Deliver(SubscriptionId, i64),
    /// A subscription of this job was cancelled.
    Cancel(SubscriptionId, JobId),
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notice::Poll(job) => write!(f, "poll {job}"),
            Notice::Deliver(sub, partition) => write!(f, "deliver {sub} {partition}"),
            Notice::Cancel(sub, job) => write!(f, "cancel {sub} {job}"),
        }
    }
}

/// A payload that is no notice of ours.
#[derive(Debug, thiserror::Error)]
#[error("not a jobhook notice")]
pub struct NotANotice;

impl FromStr for Notice {
    type Err = NotANotice;

    fn from_str(payload: &str) -> Result<Self, NotANotice> {
        let mut words = payload.split(' ');
        let notice = match (words.next(), words.next(), words.next(), words.next()) {
            (Some("poll"), Some(job), None, None) => JobId::from_key(job).ok().map(Notice::Poll),
            (Some("deliver"), Some(sub), Some(partition), None) => {
                sub.parse().ok().zip(partition.parse().ok()).map(|(s, p)| Notice::Deliver(s, p))
            }
            (Some("cancel"), Some(sub), Some(job), None) => {
                sub.parse().ok().zip(JobId::from_key(job).ok()).map(|(s, j)| Notice::Cancel(s, j))
            }
            _ => None,
        };
        notice.ok_or(NotANotice)
    }
}

/// The notices this process sent and has not yet heard back, so that its own listener skips them: the
/// sender already did locally what a notice asks (the API schedules the poll, hands the delivery to the
/// dispatcher, drops the cancelled work), and acting on it again would cost a read per registration.
/// Another instance's identical notice arriving meanwhile is skipped too, which is as safe: we have done
/// that very thing. A plain mutex: held only to count one payload in or out.
#[derive(Default)]
pub(super) struct Sent(Mutex<HashMap<String, (u32, Instant)>>);

/// Sent notices never heard back (a listener reconnecting) are forgotten after this long.
const SENT_FORGOTTEN_AFTER: Duration = Duration::from_secs(30);

impl Sent {
    /// Counts notices about to be sent (before their transaction commits, so that the echo finds them).
    pub(super) fn record<'a>(&self, payloads: impl IntoIterator<Item = &'a String>) {
        let now = Instant::now();
        let mut sent = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for payload in payloads {
            let entry = sent.entry(payload.clone()).or_insert((0, now));
            *entry = (entry.0 + 1, now);
        }
        if sent.len() > 100_000 {
            sent.retain(|_, (_, at)| now.duration_since(*at) < SENT_FORGOTTEN_AFTER);
        }
    }

    /// Whether this process sent `payload` (counting it heard).
    fn heard(&self, payload: &str) -> bool {
        let mut sent = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some((count, _)) = sent.get_mut(payload) else { return false };
        *count -= 1;
        if *count == 0 {
            sent.remove(payload);
        }
        true
    }
}

/// After this long without a notice, the listener checks that its connection still answers, within
/// [`LISTENER_CHECK_DEADLINE`].
const LISTENER_CHECK_AFTER: Duration = Duration::from_secs(30);
const LISTENER_CHECK_DEADLINE: Duration = Duration::from_secs(5);

/// Listens on [`CHANNEL`] until `shutdown`, on a connection of its own; reconnects by itself, and says
/// [`Heard::Listening`] each time it starts listening.
pub(super) fn listen(url: String, sent: Arc<Sent>, shutdown: CancellationToken) -> mpsc::Receiver<Heard> {
    let (heard, notices) = mpsc::channel(1024);
    tokio::spawn(async move {
        loop {
            let listener = async {
                let mut listener = sqlx::postgres::PgListener::connect(&url).await?;
                listener.listen(CHANNEL).await?;
                Ok::<_, sqlx::Error>(listener)
            };
            let mut listener = tokio::select! {
                _ = shutdown.cancelled() => return,
                listener = listener => match listener {
                    Ok(listener) => listener,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for notices; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        }
                    }
                },
            };
            if heard.send(Heard::Listening).await.is_err() {
                return;
            }
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    next = tokio::time::timeout(LISTENER_CHECK_AFTER, listener.try_recv()) => next,
                };
                // Quiet for a while: is the connection still there? A half-open one would be deaf for
                // good, and the notices sent meanwhile lost; a new one reloads our partitions.
                let Ok(next) = next else {
                    let check = sqlx::Executor::execute(&mut listener, "SELECT 1");
                    if let Ok(Ok(_)) = tokio::time::timeout(LISTENER_CHECK_DEADLINE, check).await {
                        continue;
                    }
                    tracing::warn!("the notice listener's connection does not answer; reconnecting");
                    break;
                };
                match next {
                    Ok(Some(notification)) => {
                        if !sent.heard(notification.payload())
                            && let Ok(notice) = notification.payload().parse()
                            && heard.send(Heard::Notice(notice)).await.is_err()
                        {
                            return;
                        }
                    }
                    // The connection dropped: reconnect (after a breath).
                    Ok(None) | Err(_) => {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => break,
                        }
                    }
                }
            }
        }
    });
    notices
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_round_trip() {
        let job: JobId = "3f1c2b9e-8a4d-4c6e-9b1a-2d5e7f9a0c11".parse().unwrap();
        let sub = SubscriptionId::new();
        for notice in [Notice::Poll(job.clone()), Notice::Deliver(sub, 7), Notice::Cancel(sub, job)] {
            assert_eq!(notice.to_string().parse::<Notice>().ok(), Some(notice));
        }
        assert_eq!(format!("deliver {sub} 7").parse::<Notice>().ok(), Some(Notice::Deliver(sub, 7)));
        assert!("poll nonsense".parse::<Notice>().is_err());
        assert!("reboot".parse::<Notice>().is_err());
    }
}
