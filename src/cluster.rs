//! Sharing the work between instances on one PostgreSQL database.
//!
//! Jobs fall into 64 partitions (a hash of the job ID); deliveries follow their job. Each instance
//! leases a share of the partitions — 64 divided by the live instances — through the `leases` table,
//! renews its leases on a timer, and polls and delivers only what its partitions hold. Leases are rows
//! with an owner and an expiry; claiming uses `FOR UPDATE SKIP LOCKED`, so two instances never take the
//! same partition, and no consensus of our own is involved. We chose partition leases over claiming due
//! rows one by one because the poll schedule stays in memory (DESIGN promise 3: a Pending answer writes
//! nothing); the cost is a few lease writes per tick, whatever the number of jobs.
//!
//! * A dead instance's leases lapse `lease-ttl × 4/5` after its last renewal; the others count it gone
//!   once its heartbeat is a TTL old and claim its partitions at their next tick (`lease-ttl / 5`), so its
//!   work is taken over within about 1.2 × the lease TTL.
//! * An instance stops working on its partitions `lease-ttl × 3/5` after its last successful renewal,
//!   whatever it is doing (a deadline in [`Ownership`], checked before each poll and delivery), so a
//!   stalled instance that resumes never works beside the one that took over.
//! * Lease times come from the database's clock, so instances whose clocks disagree still agree on who
//!   holds what. (Each instance's own deadline runs on its monotonic clock from the renewal's start.)
//! * A new instance counts itself in at its first tick; the others release their extra partitions at
//!   their next tick and it claims them. A poll or delivery already under way on the releasing instance
//!   finishes there, so one may overlap with the new owner's (a delivery is then sent twice under one
//!   `webhook-id`).
//! * An instance told to stop keeps its leases while its in-flight work finishes (at most
//!   `--shutdown-grace`), then releases them.
//! * Work registered on another instance reaches the owner through LISTEN/NOTIFY, sent in the same
//!   transaction as the write; after a lost listener connection the owner reloads its partitions.
//!
//! On SQLite there is one instance: it owns every partition and none of this runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::delivery::DispatcherHandle;
use crate::partition::{Ownership, PARTITIONS};
use crate::poller::PollerHandle;
use crate::store::{Heard, Notice, Store};

/// Every this many ticks, the owned partitions' work is reloaded from the store, in case a notice was
/// lost (about once a minute with the default TTL).
const RECONCILE_EVERY_TICKS: u64 = 20;

pub struct ClusterConfig {
    pub instance_id: String,
    pub lease_ttl: Duration,
}

/// The lease loop and the notice listener, until `shutdown`; then the leases are released.
pub async fn run(
    store: Arc<dyn Store>,
    ownership: Arc<Ownership>,
    poller: PollerHandle,
    dispatcher: DispatcherHandle,
    config: ClusterConfig,
    shutdown: CancellationToken,
) {
    let tick = config.lease_ttl / 5;
    let (lease, ttl) = (config.lease_ttl * 4 / 5, config.lease_ttl);
    let me = config.instance_id.as_str();
    let work = Work { store: store.clone(), ownership: ownership.clone(), poller, dispatcher };
    let listener = tokio::spawn(listen(store.notices(shutdown.clone()), work.clone(), shutdown.clone()));
    let mut last_renewed = Instant::now();
    let mut ticks: u64 = 0;
    // Partitions given up whose polls are still under way: renewed (so they cannot lapse to another
    // instance) but not worked on, until `drain_then_release` lets them go.
    let draining = Arc::new(AtomicU64::new(0));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(instance = me, lease_ttl = %humantime::format_duration(config.lease_ttl), "joining the cluster");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = interval.tick() => {}
        }
        // The leases a successful tick renews run from its start, so the fence counts from there too; a
        // tick that hangs (a half-open connection) is cut off after one tick.
        let started = Instant::now();
        let result = tokio::time::timeout(
            tick,
            lease_tick(store.as_ref(), me, lease, ttl, &ownership, draining.load(Ordering::Acquire)),
        )
        .await;
        match result {
            Ok(Ok((mask, excess))) => {
                if excess != 0 {
                    draining.fetch_or(excess, Ordering::AcqRel);
                    tokio::spawn(drain_then_release(
                        store.clone(),
                        me.to_owned(),
                        excess,
                        ownership.clone(),
                        draining.clone(),
                    ));
                }
                last_renewed = started;
                // The leases run for 4/5 of the TTL from before this tick; stop working a fifth of the
                // TTL before that, unless a later tick renews them.
                ownership.valid_until(started + config.lease_ttl * 3 / 5);
                work.take(mask);
                ticks += 1;
                // Notices can be lost without the listener noticing (a half-open connection, a pooler):
                // now and then, look at the store for work in our partitions.
                if ticks.is_multiple_of(RECONCILE_EVERY_TICKS) {
                    tokio::spawn(work.clone().load(ownership.mask()));
                }
            }
            failed => {
                match failed {
                    Ok(Err(e)) => tracing::error!(error = %e, "could not renew the leases"),
                    _ => tracing::error!("renewing the leases took longer than a tick"),
                }
                // Stop before the leases can lapse and another instance takes the partitions over. (The
                // deadline in `ownership` has already stopped the workers; this says so, once.)
                if last_renewed.elapsed() >= config.lease_ttl * 3 / 5 && ownership.mask.load(Ordering::Acquire) != 0 {
                    tracing::error!("leases not renewed in time: working on no partition until they are");
                    ownership.set(0);
                }
            }
        }
    }
    listener.abort();
    ownership.set(0);
    match store.leave(me).await {
        Ok(()) => tracing::info!(instance = me, "leases released"),
        Err(e) => tracing::warn!(error = %e, "could not release the leases; they lapse by themselves"),
    }
}

/// One round: announce ourselves, renew, claim our share or give up the excess. Returns the partitions
/// we hold and work on, and those we give up now (still leased: see [`drain_then_release`]).
async fn lease_tick(
    store: &dyn Store,
    me: &str,
    lease: Duration,
    ttl: Duration,
    ownership: &Ownership,
    draining: u64,
) -> crate::store::Result<(u64, u64)> {
    let now = store.clock().await?;
    let live = store.heartbeat(me, now, now - ttl).await?.max(1);
    // The draining ones are renewed too, but are no longer ours to work on.
    let mut held = store.renew_leases(me, now + lease).await? & !draining;
    let mut excess = 0u64;
    let share = (i64::from(PARTITIONS) + live - 1) / live;
    let count = i64::from(held.count_ones());
    if count < share {
        held |= store.claim_leases(me, share - count, now, now + lease).await?;
    } else if count > share {
        // Give back the highest partitions we hold beyond our share.
        let mut extra = count - share;
        for p in (0..PARTITIONS).rev() {
            if extra > 0 && held & (1 << p) != 0 {
                excess |= 1 << p;
                extra -= 1;
            }
        }
        // Stop starting work on them now; they are released once the polls under way have ended.
        ownership.set(ownership.mask() & !excess);
        held &= !excess;
    }
    Ok((held, excess))
}

/// How long a partition given up waits for its polls to end before it is released anyway (a poll is
/// bounded by the upstream timeout; this only guards against a bug leaving a count behind).
const DRAIN_AT_MOST: Duration = Duration::from_secs(120);

/// Releases `partitions` once no poll of ours is under way in them, so the instance that claims them
/// next never polls a job while we still do. (Their deliveries need no wait: an attempt holds its claim
/// in the store, and the next owner's attempt waits for it.)
async fn drain_then_release(
    store: Arc<dyn Store>,
    me: String,
    partitions: u64,
    ownership: Arc<Ownership>,
    draining: Arc<AtomicU64>,
) {
    let deadline = Instant::now() + DRAIN_AT_MOST;
    while ownership.polls_under_way(partitions) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Err(e) = store.release_leases(&me, partitions).await {
        tracing::warn!(error = %e, "could not release the leases given up; they lapse by themselves");
    }
    draining.fetch_and(!partitions, Ordering::AcqRel);
}

/// The local workers, and what to hand them when partitions come and go.
#[derive(Clone)]
struct Work {
    store: Arc<dyn Store>,
    ownership: Arc<Ownership>,
    poller: PollerHandle,
    dispatcher: DispatcherHandle,
}

impl Work {
    /// Makes `mask` our partitions; loads the work of the ones just gained (in a task of its own, so a
    /// slow load never holds up the next renewal). The workers drop the work of lost ones as it falls
    /// due. Partitions whose deadline had passed count as gained: their work was dropped meanwhile.
    fn take(&self, mask: u64) {
        let before = self.ownership.mask();
        self.ownership.set(mask);
        let gained = mask & !before;
        if mask != before {
            tracing::info!(
                partitions = mask.count_ones(),
                gained = gained.count_ones(),
                lost = (before & !mask).count_ones(),
                "leases changed"
            );
        }
        if gained != 0 {
            tokio::spawn(self.clone().load(gained));
        }
    }

    /// Hands the work stored in `partitions` to the workers. If the store cannot say, the partitions
    /// are set aside until the next renewal, which counts them as gained and loads them again.
    async fn load(self, partitions: u64) {
        let jobs = self.store.pollable_jobs_in(partitions).await;
        let deliveries = self.store.pending_deliveries_in(partitions).await;
        match (jobs, deliveries) {
            (Ok(jobs), Ok(tasks)) => {
                jobs.into_iter().for_each(|job| self.poller.adopt(job));
                self.dispatcher.deliver(tasks);
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "could not load the work of new partitions; trying again at the next renewal");
                self.ownership.set(self.ownership.mask() & !partitions);
            }
        }
    }

    async fn notice(&self, notice: Notice) {
        match notice {
            Notice::Poll(job_id) if self.ownership.owns(job_id.partition()) => {
                if let Ok(Some(job)) = self.store.pollable_job(job_id).await {
                    self.poller.ensure(job);
                }
            }
            Notice::Deliver(id, partition) if self.ownership.owns(partition) => {
                if let Ok(Some(task)) = self.store.delivery_task(id).await {
                    self.dispatcher.deliver(vec![task]);
                }
            }
            Notice::Cancel(id, job_id) if self.ownership.owns(job_id.partition()) => {
                self.dispatcher.cancel(id);
                self.poller.recheck(job_id);
            }
            _ => {}
        }
    }
}

/// Acts on other instances' notices; after the store's listener (re)connects, reloads our partitions
/// (notices sent meanwhile are lost; the store is not).
async fn listen(notices: Option<tokio::sync::mpsc::Receiver<Heard>>, work: Work, shutdown: CancellationToken) {
    let Some(mut notices) = notices else { return };
    loop {
        let heard = tokio::select! {
            _ = shutdown.cancelled() => return,
            heard = notices.recv() => heard,
        };
        match heard {
            Some(Heard::Notice(notice)) => work.notice(notice).await,
            Some(Heard::Listening) => work.clone().load(work.ownership.mask()).await,
            None => return,
        }
    }
}

/// The instance ID: the process ID and a random part, so restarts are new instances.
pub fn instance_id() -> String {
    format!("jobhook-{}-{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8])
}
