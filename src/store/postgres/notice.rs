//! Notices between instances: what one instance tells the others through LISTEN/NOTIFY, sent in the
//! same transaction as the write it is about (so it is delivered when that commits, or never). The wire
//! form is written and read here only: `poll <job_id>`, `deliver <subscription_id> <partition>`,
//! `cancel <subscription_id> <job_id>`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::domain::{JobId, SubscriptionId};
use crate::store::Heard;

/// The PostgreSQL channel that carries work between instances.
pub const CHANNEL: &str = "jobhook";

/// Work another instance may own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
            (Some("poll"), Some(job), None, None) => job.parse().ok().map(Notice::Poll),
            (Some("deliver"), Some(sub), Some(partition), None) => {
                sub.parse().ok().zip(partition.parse().ok()).map(|(s, p)| Notice::Deliver(s, p))
            }
            (Some("cancel"), Some(sub), Some(job), None) => {
                sub.parse().ok().zip(job.parse().ok()).map(|(s, j)| Notice::Cancel(s, j))
            }
            _ => None,
        };
        notice.ok_or(NotANotice)
    }
}

/// Listens on [`CHANNEL`] until `shutdown`, on a connection of its own; reconnects by itself, and says
/// [`Heard::Listening`] each time it starts listening.
pub(super) fn listen(url: String, shutdown: CancellationToken) -> mpsc::Receiver<Heard> {
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
                    next = listener.try_recv() => next,
                };
                match next {
                    Ok(Some(notification)) => {
                        if let Ok(notice) = notification.payload().parse()
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
        for notice in [Notice::Poll(job), Notice::Deliver(sub, 7), Notice::Cancel(sub, job)] {
            assert_eq!(notice.to_string().parse::<Notice>().ok(), Some(notice));
        }
        assert_eq!(format!("deliver {sub} 7").parse::<Notice>().ok(), Some(Notice::Deliver(sub, 7)));
        assert!("poll nonsense".parse::<Notice>().is_err());
        assert!("reboot".parse::<Notice>().is_err());
    }
}
