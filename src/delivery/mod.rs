//! The dispatcher: signed POSTs to callbacks, retried on a schedule until one is accepted.
//!
//! Deliveries come from the outbox (the store) at start-up and from the poller as jobs end. Each waits in
//! the shared [`Schedule`](crate::schedule::Schedule) until it is due ([`dispatcher`]); [`attempt`] makes
//! one signed request and decides what follows; the result and the attempt's log row are committed
//! together. A dead host waits in its own retry schedule, and concurrency is capped per host and overall,
//! so no receiver slows the others (DESIGN promise 6).

pub mod attempt;
pub mod breaker;
pub mod client;
pub mod dispatcher;
pub mod envelope;
pub mod response;
pub mod retry;
pub mod secrets;
pub mod signing;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};

use crate::config::DeliveryConfig;
use crate::config::EgressPolicy;
use crate::domain::SubscriptionId;
use crate::store::{DeliveryTask, Store};
pub use attempt::{AttemptOutcome, DeliveryOutcome, SendError, attempt, decide};
pub use breaker::Breaker;
pub use dispatcher::run;
pub use secrets::SecretsCache;

/// How much of a receiver's answer we read (and then drop): enough to reuse the connection after a
/// normal short answer, little enough that an endless body costs nothing.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024;

/// An attempt starts only under a claim that outlasts its timeout by this much: the time to record its
/// outcome, which releases the claim. (If recording takes longer, say a database outage, the claim
/// lapses and a cancellation could commit although the request was answered.)
const RECORD_MARGIN: Duration = Duration::from_secs(15);
/// How long a claim taken ahead of an attempt (with its job's result) may wait for a slot and still serve.
const SLOT_MARGIN: Duration = Duration::from_secs(15);

/// Everything an attempt needs.
pub struct DeliveryContext {
    pub store: Arc<dyn Store>,
    pub http: reqwest::Client,
    pub policy: EgressPolicy,
    pub config: DeliveryConfig,
    overall: Arc<Semaphore>,
    per_host: Mutex<HashMap<String, Arc<Semaphore>>>,
    per_tenant: Mutex<HashMap<i64, Arc<Semaphore>>>,
    /// Each tenant's signing secrets, shared with the API that rotates them.
    pub secrets: Arc<SecretsCache>,
    /// The partitions this instance delivers (all of them on SQLite).
    pub ownership: Arc<crate::partition::Ownership>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The breaker per callback host, shared with the API that lists and resumes them.
    pub breaker: Arc<Breaker>,
    /// How each upstream profile's final body names its event (`job.succeeded` / `job.failed`).
    pub events: crate::config::upstreams::EventTypes,
}

impl DeliveryContext {
    pub fn new(
        store: Arc<dyn Store>,
        secrets: Arc<SecretsCache>,
        policy: EgressPolicy,
        lookup: client::Lookup,
        config: DeliveryConfig,
        ownership: Arc<crate::partition::Ownership>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        DeliveryContext {
            breaker: Arc::new(Breaker::new(config.breaker, metrics.breakers_open.clone())),
            events: Default::default(),
            metrics,
            http: client::callback_client(&policy, lookup, config.timeout),
            overall: Arc::new(Semaphore::new(config.max_in_flight)),
            per_host: Mutex::new(HashMap::new()),
            per_tenant: Mutex::new(HashMap::new()),
            secrets,
            ownership,
            store,
            policy,
            config,
        }
    }

    /// How long a delivery's claim lasts: the attempt's timeout, time to record its outcome, and time to
    /// wait for a slot, so a first attempt claimed with its job's result rarely needs a claim of its own.
    pub fn claim_for(config: &DeliveryConfig) -> Duration {
        config.timeout + RECORD_MARGIN + SLOT_MARGIN
    }

    /// Waits for a slot of the tenant, then of the host, then overall (always in that order, so two
    /// attempts never wait for each other's slots). Every cap holds: one tenant's slow hosts, however
    /// many names they have, cannot take every slot, nor can one host.
    async fn slots(&self, tenant_id: i64, host: &str) -> Slots {
        let tenant = semaphore(&self.per_tenant, tenant_id, self.config.max_in_flight_per_tenant);
        let host = semaphore(&self.per_host, host.to_owned(), self.config.max_in_flight_per_host);
        // None of the semaphores is ever closed.
        let tenant = tenant.acquire_owned().await.expect("delivery semaphores are never closed");
        let host = host.acquire_owned().await.expect("delivery semaphores are never closed");
        let overall = self.overall.clone().acquire_owned().await.expect("delivery semaphores are never closed");
        Slots { _permits: [tenant, host, overall] }
    }
}

/// The slots an attempt holds while its request runs.
struct Slots {
    _permits: [tokio::sync::OwnedSemaphorePermit; 3],
}

/// The semaphore of one key (a host, a tenant), made on first use.
fn semaphore<K: std::hash::Hash + Eq>(
    map: &Mutex<HashMap<K, Arc<Semaphore>>>,
    key: K,
    permits: usize,
) -> Arc<Semaphore> {
    let mut map = map.lock().expect("the semaphore maps are never poisoned: no code panics while holding one");
    if map.len() > 10_000 {
        // Forget keys nobody is calling right now, so the map does not grow without bound.
        map.retain(|_, s| Arc::strong_count(s) > 1);
    }
    map.entry(key).or_insert_with(|| Arc::new(Semaphore::new(permits))).clone()
}

pub(crate) enum DispatcherMsg {
    Deliver(Vec<DeliveryTask>),
    Cancel(SubscriptionId),
}

/// How the poller and the API hand deliveries to the dispatcher.
#[derive(Clone)]
pub struct DispatcherHandle {
    tx: mpsc::UnboundedSender<DispatcherMsg>,
    claim_for: Duration,
}

impl DispatcherHandle {
    pub fn deliver(&self, tasks: Vec<DeliveryTask>) {
        if !tasks.is_empty() {
            // Fails only once the dispatcher has stopped; the deliveries are in the store and resume at
            // the next start.
            let _ = self.tx.send(DispatcherMsg::Deliver(tasks));
        }
    }

    pub fn cancel(&self, id: SubscriptionId) {
        let _ = self.tx.send(DispatcherMsg::Cancel(id));
    }

    /// How long the deliveries of a job that ends are claimed for their first attempt.
    pub fn claim_for(&self) -> Duration {
        self.claim_for
    }
}

pub struct DispatcherInbox(pub(crate) mpsc::UnboundedReceiver<DispatcherMsg>);

pub fn channel(config: &DeliveryConfig) -> (DispatcherHandle, DispatcherInbox) {
    // Unbounded: every message stands for deliveries already committed to the store.
    let (tx, rx) = mpsc::unbounded_channel();
    (DispatcherHandle { tx, claim_for: DeliveryContext::claim_for(config) }, DispatcherInbox(rx))
}
