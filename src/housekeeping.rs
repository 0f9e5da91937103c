//! Periodic work on tokio-cron-scheduler: the retention purge (DESIGN promise 12: cost does not grow
//! with history).
//!
//! On its schedule, housekeeping deletes the subscriptions that ended (delivered, failed, expired,
//! cancelled) longer ago than the retention, with their delivery attempts and the jobs nobody refers to
//! any more, in small batches — one short transaction each, so registrations and deliveries slip in
//! between — and then hands the freed pages back (SQLite's incremental vacuum). Live subscriptions are
//! never purged. With several instances on PostgreSQL, one purges at a time (an advisory lock); the
//! others skip their run. `jobhook purge` runs the same purge once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;

use crate::config::HousekeepingConfig;
use crate::domain::Timestamp;
use crate::metrics::Metrics;
use crate::store::{Purged, Store, StoreError};

/// The most subscriptions one purge transaction deletes: small enough that a registration queued
/// behind it waits a few milliseconds, large enough to keep up with any steady rate (each batch takes
/// a few ms; a run deletes tens of thousands a second).
pub const PURGE_BATCH: u32 = 200;

/// Deletes everything that ended before `ended_before`, batch by batch (each batch is told to
/// `each_batch` as it commits), then reclaims the space. `None` when another instance is purging now.
pub async fn purge(
    store: &dyn Store,
    ended_before: Timestamp,
    mut each_batch: impl FnMut(&Purged),
) -> Result<Option<Purged>, StoreError> {
    let mut total = Purged::default();
    loop {
        let Some(batch) = store.purge_ended(ended_before, PURGE_BATCH).await? else {
            return Ok(None);
        };
        each_batch(&batch);
        total.add(&batch);
        // A batch may stop short of the limit (SQLite's time budget), so only an empty one means done.
        if batch.subscriptions == 0 {
            break;
        }
        // Let the writes queued behind this batch go first.
        tokio::task::yield_now().await;
    }
    if total.subscriptions > 0 {
        store.reclaim_space().await?;
    }
    Ok(Some(total))
}

/// One scheduled run: purge with the retention, count it, say what was done in one line.
async fn run_once(store: &dyn Store, retention: Duration, metrics: &Metrics) {
    let started = std::time::Instant::now();
    let ended_before = Timestamp::now() - retention;
    // Counted batch by batch, so a long purge shows its progress.
    let count = |batch: &Purged| {
        metrics.purged_subscriptions.inc_by(batch.subscriptions);
        metrics.purged_attempts.inc_by(batch.attempts);
        metrics.purged_jobs.inc_by(batch.jobs);
    };
    match purge(store, ended_before, count).await {
        Ok(Some(purged)) => {
            tracing::info!(
                subscriptions = purged.subscriptions,
                attempts = purged.attempts,
                jobs = purged.jobs,
                took_ms = started.elapsed().as_millis() as u64,
                retention = %humantime::format_duration(retention),
                "housekeeping: purged what ended before the retention"
            );
        }
        Ok(None) => tracing::info!("housekeeping: another instance is purging; skipped"),
        Err(e) => tracing::error!(error = %e, "housekeeping: the purge failed; it runs again at the next tick"),
    }
}

/// Runs housekeeping on its schedule until `shutdown`. Does nothing (and returns at shutdown) when the
/// retention is 0 (keep everything).
pub async fn run(
    store: Arc<dyn Store>,
    config: HousekeepingConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Some(retention) = config.retention else {
        tracing::info!("housekeeping: retention is 0, nothing is ever purged");
        shutdown.cancelled().await;
        return Ok(());
    };
    let mut scheduler = JobScheduler::new().await?;
    // A run still going when the next falls due: the next is skipped, not stacked.
    let running = Arc::new(AtomicBool::new(false));
    let job = Job::new_async(config.schedule.as_str(), move |_, _| {
        let (store, metrics, running) = (store.clone(), metrics.clone(), running.clone());
        Box::pin(async move {
            if running.swap(true, Ordering::AcqRel) {
                return;
            }
            run_once(store.as_ref(), retention, &metrics).await;
            running.store(false, Ordering::Release);
        })
    })?;
    scheduler.add(job).await?;
    scheduler.start().await?;
    tracing::info!(schedule = %config.schedule, retention = %humantime::format_duration(retention), "housekeeping scheduled");
    shutdown.cancelled().await;
    scheduler.shutdown().await?;
    Ok(())
}
