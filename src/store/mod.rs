//! Durable state behind one interface, [`Store`].
//!
//! What the store promises (DESIGN.md 1–3):
//! * a method that returns `Ok` has committed (a 201 is durable);
//! * [`Store::complete_job`] writes the job's result and the deliveries it creates in one transaction (the
//!   outbox): nobody can see a job finished with no delivery scheduled;
//! * nothing is written for a Pending poll; the poller writes only at transitions.
//!
//! Two implementations, one module each: `sqlite/` (embedded, the default: rusqlite, one writer
//! thread with group commit, a small reader pool) and `postgres/` (several instances sharing one
//! database: native sqlx `PgPool`, group commit with multi-row statements, notices). Both pass the same
//! integration suite (scripts/test.sh runs it on each). Nothing in this file knows either backend.

mod bulk;
mod group;
mod idempotency;
mod postgres;
mod rows;
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::domain::{
    CallbackHeaders, CallbackUrl, FailureReason, JobId, JobStatus, Payload, SubscriptionId, SubscriptionState,
    Timestamp,
};
use crate::keys::{KeyHash, SigningSecret};

pub use bulk::{BulkFilter, BulkRedelivered, REDELIVER_BATCH, redeliver_matching};
pub use idempotency::{Claimed, IdempotencyClaim, PURGE_PER_CLAIM, StoredAnswer};
pub use postgres::Notice;
pub use sqlite::{lock_sqlite_for_serving, sqlite_file};

/// The statement the store at `url` runs for `GET /v1/subscriptions` with `filter` (the tests read its
/// plan): placeholders `$1` (the tenant), then [`ListFilter`]'s values in order, then the limit.
pub fn list_statement(url: &str, filter: &ListFilter) -> String {
    if sqlite_file(url).is_some() { sqlite::list_statement(filter) } else { postgres::list_statement(filter) }
}

/// The statement the store at `url` runs to find what a bulk redelivery matches (the tests read its
/// plan); binds as [`bulk::matching_query`] says.
pub fn bulk_statement(url: &str, filter: &BulkFilter) -> String {
    if sqlite_file(url).is_some() { sqlite::bulk_statement(filter) } else { postgres::bulk_statement(filter) }
}

/// Whether a `--database-url` names a store we can open; the error is a sentence.
pub fn check_url(url: &str) -> Result<(), String> {
    if url.starts_with("sqlite:") || url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Ok(())
    } else {
        Err("must start with sqlite:// (for example sqlite://jobhook.db) or postgres://".into())
    }
}

/// Opens the store a URL names, creating and migrating it as needed.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    open_with(url, Arc::default()).await
}

/// Opens the store a URL names; its writers count what they do in `stats` (see [`WriterStats`]).
pub async fn open_with(url: &str, stats: Arc<WriterStats>) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Ok(Arc::new(postgres::PgStore::open(url, stats).await?))
    } else {
        Ok(Arc::new(sqlite::SqliteStore::open(url, stats).await?))
    }
}

/// The cause behind a [`StoreError`]: the driver's error, or one of ours below. Shared (`Arc`), so one
/// failed commit can answer every write of its batch.
pub type Cause = Arc<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot take the write now: disk full, read-only file, I/O error, locked too long,
    /// unreachable. Nothing was committed; the caller may try again later.
    #[error("the database is unavailable: {0}")]
    Unavailable(#[source] Cause),
    #[error("database error: {0}")]
    Other(#[source] Cause),
    #[error("could not migrate the database: {0}")]
    Migrate(#[source] Cause),
    #[error("a stored row is not readable: {0}")]
    Corrupt(String),
    /// The PostgreSQL server answers but has no database of that name: it is made once, by whoever
    /// runs the server (jobhook creates its tables, not its database).
    #[error("database {0:?} does not exist on that server; create it with: createdb {0}")]
    NoDatabase(String),
    /// The URL names no store we can open (an in-memory SQLite database, for one).
    #[error("{0}")]
    BadUrl(&'static str),
}

/// Causes of [`StoreError::Unavailable`] that come from the store itself rather than the driver.
#[derive(Debug, thiserror::Error)]
pub enum Trouble {
    /// The store's writer has stopped (the service is shutting down).
    #[error("the store's writer has stopped")]
    WriterGone,
    /// A write batch got no answer in time; its connection was dropped and nothing committed.
    #[error("a write batch got no answer from the database within {0:?}")]
    BatchDeadline(Duration),
    /// A call on the database got no answer in time (its connection is closed, not reused).
    #[error("no answer from the database within {0:?}")]
    NoAnswer(Duration),
    /// Writes failed as unavailable lately and none has gone through since (see [`Store::ping`]).
    #[error("writes are failing")]
    WritesFailing,
    /// No connection could be had in time.
    #[error("no database connection within {0:?}")]
    ConnectTimeout(Duration),
}

impl StoreError {
    /// An `Unavailable` error with one of our own causes.
    pub fn trouble(t: Trouble) -> Self {
        StoreError::Unavailable(Arc::new(t))
    }
}

pub use crate::metrics::WriterStats;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A caller of the API, known by one of its keys.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: i64,
    pub secret: Arc<SigningSecret>,
}

/// One subscription as a tenant names it. Every read or change the API makes to a subscription is
/// scoped to the tenant asking (another tenant's ID is "no such subscription"), so the two go together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantSub {
    pub tenant_id: i64,
    pub id: SubscriptionId,
}

/// A subscription as the API shows it.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub id: SubscriptionId,
    pub job_id: JobId,
    pub callback_url: String,
    pub state: SubscriptionState,
    pub job_status: Option<JobStatus>,
    pub failure_reason: Option<FailureReason>,
    pub last_error: Option<String>,
    /// What went wrong with the last delivery attempt, if it failed.
    pub last_delivery_error: Option<String>,
    pub webhook_id: Option<String>,
    pub attempts: u32,
    pub next_attempt_at: Option<Timestamp>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// The names of its custom headers (lower case, sorted); their values are never read back for views.
    pub header_names: Vec<String>,
    pub payload: Payload,
    /// A JSON object, serialised.
    pub metadata: Option<String>,
}

/// A job that has subscriptions waiting on it, as the poller needs to schedule it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollableJob {
    pub job_id: JobId,
    /// When the job was first registered: the start of its 404 grace and of its interval growth.
    pub job_created_at: Timestamp,
    /// The creation time of its oldest polling subscription: the next one to expire.
    pub oldest_polling_at: Timestamp,
}

/// One subscriber's delivery, with everything an attempt needs.
#[derive(Debug, Clone)]
pub struct DeliveryTask {
    pub subscription_id: SubscriptionId,
    /// The job whose result this delivers (for logs).
    pub job_id: JobId,
    /// Whose secrets sign it; they are looked up at each attempt, so a rotation applies at once.
    pub tenant_id: i64,
    /// The job's partition (which instance delivers it, when several share the work).
    pub partition: i64,
    pub webhook_id: String,
    pub callback_url: String,
    /// The subscription's custom headers, body form and metadata (shared: a task is cloned on its way
    /// to the dispatcher, and this is the bulk of it).
    pub form: Arc<DeliveryForm>,
    /// The job's result, as the upstream answered.
    pub body: Bytes,
    /// When the job ended (an envelope's `timestamp`).
    pub finished_at: Timestamp,
    /// The delivery series (1, then one more per redelivery) and the attempts made in it.
    pub series: u32,
    pub attempts_made: u32,
    pub due_at: Timestamp,
    /// Until when (on this process's monotonic clock) this instance holds the delivery's claim, if it
    /// does: an attempt may start only under a claim that outlasts it (see [`Store::claim_delivery`]).
    pub claimed_until: Option<std::time::Instant>,
}

impl DeliveryTask {
    /// A new delivery (series 1, no attempt yet) of a job's result, due `now`.
    pub fn first(
        subscription_id: SubscriptionId,
        job_id: JobId,
        tenant_id: i64,
        webhook_id: String,
        callback_url: String,
        body: Bytes,
        now: Timestamp,
    ) -> Self {
        DeliveryTask {
            subscription_id,
            partition: job_id.partition(),
            job_id,
            tenant_id,
            webhook_id,
            callback_url,
            form: Arc::default(),
            body,
            finished_at: now,
            series: 1,
            attempts_made: 0,
            due_at: now,
            claimed_until: None,
        }
    }
}

impl DeliveryTask {
    /// The same task in the subscription's form (headers, payload, metadata).
    pub fn with_form(mut self, form: DeliveryForm) -> Self {
        self.form = Arc::new(form);
        self
    }
}

/// A job's terminal answer as [`Store::complete_job`] stores it.
#[derive(Debug, Clone)]
pub struct JobEnd {
    pub job_id: JobId,
    pub status: JobStatus,
    /// The upstream's final response body, byte for byte: what the deliveries carry.
    pub body: Bytes,
    pub now: Timestamp,
}

/// What the upstream last said of a job that has not ended, as [`Store::record_observation`] stores it.
#[derive(Debug, Clone)]
pub struct Observation {
    pub job_id: JobId,
    pub status: Option<JobStatus>,
    pub last_error: Option<String>,
    pub now: Timestamp,
}

/// A registration as the store takes it: the caller's key (its tenant is looked up in the registering
/// transaction), the new subscription's ID (kept only if no live subscription is the same one), and what
/// it subscribes to.
#[derive(Debug, Clone)]
pub struct Registration {
    pub key: KeyHash,
    pub id: SubscriptionId,
    pub job_id: JobId,
    pub callback_url: CallbackUrl,
    pub form: DeliveryForm,
    pub now: Timestamp,
}

/// How a subscription wants its deliveries: its custom headers (their `Debug` shows names only), the
/// body's form, and the caller's metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryForm {
    pub headers: CallbackHeaders,
    pub payload: Payload,
    /// A JSON object, serialised (see [`crate::domain::metadata_from_request`]).
    pub metadata: Option<String>,
}

impl DeliveryForm {
    /// From the stored columns.
    pub(crate) fn from_stored(headers: Option<&str>, payload: Option<&str>, metadata: Option<String>) -> Result<Self> {
        Ok(DeliveryForm {
            headers: CallbackHeaders::from_stored(headers).map_err(|e| rows::corrupt("callback headers", e))?,
            payload: Payload::from_stored(payload).map_err(|e| rows::corrupt("payload", e))?,
            metadata,
        })
    }
}

/// What asking for a delivery's claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Ours until this moment (this process's monotonic clock, a little before the stored expiry).
    Held(std::time::Instant),
    /// Another instance holds it (an attempt may be under way there) until about this time.
    Busy(Timestamp),
    /// The delivery is no longer waiting: cancelled, delivered, failed, or a newer series replaced it.
    Gone,
}

/// What a new registration led to.
#[derive(Debug)]
pub enum Registered {
    /// A new subscription; the job must be polled (it has no result yet).
    CreatedPolling(Subscription, PollableJob),
    /// A new subscription to a job whose result we already hold: deliver it now.
    CreatedDelivering(Subscription, DeliveryTask),
    /// The same tenant, job, callback and headers were already registered: this is that subscription.
    Existing(Subscription),
    /// The same tenant, job and callback are registered (this subscription, in this state) with other
    /// custom headers: nothing was written.
    HeadersDiffer { id: SubscriptionId, state: SubscriptionState },
    /// No usable API key has this hash (unknown or revoked): nothing was written.
    UnknownKey,
}

/// One delivery attempt as it happened.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub subscription_id: SubscriptionId,
    /// The job's partition: writes about one job go through one writer (0 where it does not matter).
    pub partition: i64,
    pub series: u32,
    pub attempt: u32,
    pub webhook_id: String,
    pub started_at: Timestamp,
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub duration_ms: u64,
    /// The answer's `Content-Type`, if it answered with one.
    pub response_content_type: Option<String>,
    /// The first 2 KiB of the answer's body (lossy UTF-8), if it answered.
    pub response_body: Option<String>,
}

/// Where a delivery goes after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptResult {
    Delivered,
    RetryAt(Timestamp),
    Failed(FailureReason),
}

/// The filters of `GET /v1/subscriptions`.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub job_id: Option<JobId>,
    pub state: Option<SubscriptionState>,
    /// Only subscriptions created before this one (the cursor).
    pub before: Option<SubscriptionId>,
    pub limit: u32,
}

/// What a redelivery request found.
#[derive(Debug)]
pub enum Redelivery {
    /// A new delivery series starts now, under the same `webhook-id`.
    Started(DeliveryTask),
    /// The subscription is not in a state that can be redelivered (it never got a result, or it is
    /// still being worked on).
    NotEnded(SubscriptionState),
    /// A newer subscription of the same job and callback is live or delivered.
    Superseded,
}

/// What asking to retry a waiting delivery now found.
#[derive(Debug)]
pub enum RetryNow {
    /// Its next attempt is due now (same series, same `webhook-id`); hand the task to the dispatcher.
    Due(DeliveryTask),
    /// The subscription is not waiting for a retry: it is in this state.
    NotDelivering(SubscriptionState),
}

/// An API key as `jobhook keys list` shows it (never the key itself).
#[derive(Debug, Clone)]
pub struct KeyInfo {
    pub id: i64,
    pub tenant_id: i64,
    pub name: String,
    pub source: String,
    pub created_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

/// What a cancellation found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancel {
    /// Cancelled now; this was the state before (the workers let go of the subscription).
    Cancelled { job_id: JobId, was: SubscriptionState },
    /// It had already ended in this state (`cancelled` included): nothing changed.
    Ended(SubscriptionState),
    /// A delivery attempt holds the subscription's claim, so it may be on the wire: nothing changed.
    /// Once the attempt is recorded the subscription either ended or can be cancelled.
    AttemptInFlight,
}

/// What a purge deleted (or, counted for a dry run, would delete).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub subscriptions: u64,
    pub attempts: u64,
    pub jobs: u64,
}

impl Purged {
    pub fn add(&mut self, other: &Purged) {
        self.subscriptions += other.subscriptions;
        self.attempts += other.attempts;
        self.jobs += other.jobs;
    }
}

/// What a listener on other instances' notices heard (see [`Store::notices`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// Listening (again): notices sent before now may have been missed.
    Listening,
    Notice(Notice),
}

/// The API keys the configuration lists, and the signing secret it gives their tenants, as
/// [`Store::sync_configured_keys`] applies them.
#[derive(Clone, Copy)]
pub struct KeyConfig<'a> {
    pub keys: &'a [KeyHash],
    /// `None`: each new tenant gets a fresh secret.
    pub secret: Option<&'a SigningSecret>,
}

/// What [`Store::sync_configured_keys`] did.
#[derive(Debug, Default)]
pub struct ConfiguredKeys {
    /// Tenants created for keys seen for the first time.
    pub created: usize,
    /// IDs of keys still listed in the configuration but revoked with `jobhook keys revoke`.
    pub revoked_by_command: Vec<i64>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    // --- tenants and keys ---

    /// Makes sure a key from the configuration exists as a tenant. `secret` becomes their signing
    /// secret when it differs from the one applied at an earlier start (so a rotation through the API
    /// outlives restarts). Configured keys no longer in `keys` are revoked; listed again, they work
    /// again, except those revoked with `jobhook keys revoke`.
    async fn sync_configured_keys(&self, configured: KeyConfig<'_>, now: Timestamp) -> Result<ConfiguredKeys>;
    /// A new tenant with a stored key and a fresh secret.
    async fn create_key(&self, name: &str, key: KeyHash, secret: &SigningSecret, now: Timestamp) -> Result<i64>;
    /// Another stored key for an existing tenant, which keeps its secret and subscriptions (a lost key
    /// is replaced this way); the new key's ID, or `None` when there is no such tenant.
    async fn add_key(&self, tenant_id: i64, name: &str, key: KeyHash, now: Timestamp) -> Result<Option<i64>>;
    /// How many keys can be used to call the API.
    async fn usable_key_count(&self) -> Result<i64>;
    async fn tenant_by_key(&self, key: KeyHash) -> Result<Option<Tenant>>;
    async fn list_keys(&self) -> Result<Vec<KeyInfo>>;
    /// Revokes a key by its ID; false when there is no such usable key.
    async fn revoke_key(&self, id: i64, now: Timestamp) -> Result<bool>;
    /// The secrets that sign a tenant's deliveries now: the current one first, then the previous one
    /// while its rotation grace lasts.
    async fn signing_secrets(&self, tenant_id: i64, now: Timestamp) -> Result<Vec<SigningSecret>>;
    /// Makes `new` the tenant's secret; the current one keeps signing beside it until `previous_until`.
    async fn rotate_secret(&self, tenant_id: i64, new: &SigningSecret, previous_until: Timestamp) -> Result<()>;
    /// A server-wide random value made on first use and kept (e.g. the cursor key).
    async fn meta_secret(&self, name: &str) -> Result<Vec<u8>>;

    // --- the API ---

    /// Registers as the tenant holding `key` (checked in the same transaction, so a revoked key is refused
    /// at once); [`Registered::UnknownKey`] when no usable key has that hash. `form` is stored with the
    /// subscription; its headers are part of its identity (see [`Registered::HeadersDiffer`]).
    async fn register(&self, registration: Registration) -> Result<Registered>;
    async fn subscription(&self, sub: TenantSub) -> Result<Option<Subscription>>;
    /// Takes an Idempotency-Key for a request, or says who holds it (committed before it answers).
    async fn claim_idempotency_key(&self, claim: IdempotencyClaim) -> Result<Claimed>;
    /// Stores the answer to the request that claimed `key`.
    async fn finish_idempotency_key(&self, tenant_id: i64, key: &str, answer: &StoredAnswer) -> Result<()>;
    async fn list_subscriptions(&self, tenant_id: i64, filter: &ListFilter) -> Result<Vec<Subscription>>;
    /// Cancels a live subscription, unless a delivery attempt holds its claim (promise 11: a subscription
    /// that reads `cancelled` was never delivered). `None` when the tenant has no such subscription.
    async fn cancel(&self, sub: TenantSub, now: Timestamp) -> Result<Option<Cancel>>;
    /// The attempts of a subscription, oldest first; `None` when the tenant has no such subscription.
    async fn attempts(&self, sub: TenantSub) -> Result<Option<Vec<AttemptRecord>>>;
    /// Starts a new delivery series for a delivered or failed subscription whose job has a result;
    /// `None` when the tenant has no such subscription.
    async fn redeliver(&self, sub: TenantSub, now: Timestamp) -> Result<Option<Redelivery>>;
    /// Makes a delivering subscription's next attempt due `now`, in its current series (a receiver that
    /// was fixed need not wait for its next retry). Only `next_attempt_at` changes: a claim held by an
    /// attempt on the wire stays, and that attempt's outcome sets the next time as usual. On PostgreSQL
    /// the owning instance is told with a notice. `None`: no such subscription for this tenant.
    async fn retry_now(&self, sub: TenantSub, now: Timestamp) -> Result<Option<RetryNow>>;
    /// The tenant's subscriptions that a bulk redelivery with `filter` would take, at most one more
    /// than its limit (see [`redeliver_matching`]).
    async fn matching_ended(&self, tenant_id: i64, filter: &BulkFilter) -> Result<Vec<SubscriptionId>>;
    /// [`Store::redeliver`] for each of `ids` (the tenant's), in one transaction; what each found, in order.
    async fn redeliver_batch(&self, tenant_id: i64, ids: &[SubscriptionId], now: Timestamp) -> Result<Vec<Redelivery>>;

    // --- the poller ---

    /// Every job with at least one polling subscription (start-up).
    async fn pollable_jobs(&self) -> Result<Vec<PollableJob>>;
    /// One job, if it still has polling subscriptions.
    async fn pollable_job(&self, job_id: JobId) -> Result<Option<PollableJob>>;
    /// Records what the upstream last said, at a transition (first status, an error appearing, changing
    /// or clearing). Never called for a repeated Pending.
    async fn record_observation(&self, observation: Observation) -> Result<()>;
    /// The job ended: one transaction stores its result and turns every polling subscription into a
    /// delivery due now, claimed by this instance for `claim_for` (its first attempt needs no write of
    /// its own). Returns those deliveries.
    async fn complete_job(&self, end: JobEnd, claim_for: Duration) -> Result<Vec<DeliveryTask>>;
    /// Every polling subscription of the job fails for this reason. Returns how many.
    async fn fail_job(&self, job_id: JobId, reason: FailureReason, last_error: &str, now: Timestamp) -> Result<u64>;
    /// Polling subscriptions created at or before `cutoff` expire. Returns how many, and the job if some
    /// still poll.
    async fn expire(&self, job_id: JobId, cutoff: Timestamp, now: Timestamp) -> Result<(u64, Option<PollableJob>)>;

    /// How many subscriptions are in each state (for `GET /metrics`): read from counts kept in the
    /// same transactions as the changes, never by counting the table.
    async fn count_by_state(&self) -> Result<Vec<(String, i64)>>;

    // --- housekeeping ---

    /// Deletes, in one short transaction, up to `limit` subscriptions that ended (delivered, failed,
    /// expired, cancelled) before `ended_before`, oldest first, with their delivery attempts and the jobs
    /// no subscription refers to any more; fewer when the transaction's time is up (SQLite), but at
    /// least one while any is left. `None` when another instance is purging (PostgreSQL).
    async fn purge_ended(&self, ended_before: Timestamp, limit: u32) -> Result<Option<Purged>>;
    /// What [`Store::purge_ended`] would delete, all batches together (`jobhook purge --dry-run`).
    async fn purgeable(&self, ended_before: Timestamp) -> Result<Purged>;
    /// Hands pages freed by a purge back to the file system (SQLite's incremental vacuum; PostgreSQL's
    /// autovacuum does this by itself).
    async fn reclaim_space(&self) -> Result<()>;
    /// Proves the database answers a read, and, after writes failed as unavailable, that a write goes
    /// through again (for `GET /readyz`).
    async fn ping(&self) -> Result<()>;

    /// Notices from other instances sharing this store, until `shutdown`: `None` where no other instance
    /// can share it (SQLite). The listener reconnects by itself and says [`Heard::Listening`] each time
    /// it (re)starts listening: notices sent meanwhile are lost, so the caller reloads its work.
    fn notices(&self, shutdown: tokio_util::sync::CancellationToken) -> Option<tokio::sync::mpsc::Receiver<Heard>>;

    /// How many write transactions this store has started (for the benchmark's writes-per-job figure).
    fn transactions(&self) -> u64 {
        self.writer_stats().transactions.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// The writer's counters, read at each scrape of `GET /metrics`.
    fn writer_stats(&self) -> Arc<WriterStats>;

    // --- scale-out (PostgreSQL; see cluster.rs) ---

    /// Whether several instances share this store through leases.
    fn shared(&self) -> bool;
    /// The database's clock, in milliseconds since the epoch: the one clock every instance's lease times
    /// are read from, so instances whose own clocks disagree still agree on who holds what.
    async fn clock(&self) -> Result<Timestamp>;
    /// Announces this instance; returns how many instances have announced themselves after `live_after`.
    async fn heartbeat(&self, instance: &str, now: Timestamp, live_after: Timestamp) -> Result<i64>;
    /// Extends every lease this instance holds to `until`; returns them (a partition mask).
    async fn renew_leases(&self, instance: &str, until: Timestamp) -> Result<u64>;
    /// Takes up to `n` free or lapsed leases until `until`; returns them (a partition mask).
    async fn claim_leases(&self, instance: &str, n: i64, now: Timestamp, until: Timestamp) -> Result<u64>;
    /// Gives back the leases in `partitions` (a mask).
    async fn release_leases(&self, instance: &str, partitions: u64) -> Result<()>;
    /// Gives back every lease of this instance and the delivery claims its workers still hold (call it
    /// once they have stopped), and forgets it.
    async fn leave(&self, instance: &str) -> Result<()>;
    /// The jobs with polling subscriptions in these partitions (a mask).
    async fn pollable_jobs_in(&self, partitions: u64) -> Result<Vec<PollableJob>>;
    /// The deliveries waiting in these partitions (a mask).
    async fn pending_deliveries_in(&self, partitions: u64) -> Result<Vec<DeliveryTask>>;
    /// One delivery waiting, by its subscription.
    async fn delivery_task(&self, id: SubscriptionId) -> Result<Option<DeliveryTask>>;

    // --- the dispatcher ---

    /// Every delivery waiting for an attempt (start-up).
    async fn pending_deliveries(&self) -> Result<Vec<DeliveryTask>>;
    /// Claims a waiting delivery of `series` for this instance for `claim_for`, so that no cancellation
    /// commits and no other instance attempts it meanwhile. Taken when unclaimed, when the claim lapsed,
    /// or when this instance already holds it. Claims are kept on the database's clock.
    async fn claim_delivery(&self, task: &DeliveryTask, claim_for: Duration) -> Result<Claim>;
    /// Logs an attempt, moves the delivery on and releases its claim, in one transaction. Returns false
    /// when the subscription was no longer delivering (possible only once a claim lapsed); the attempt is
    /// logged anyway.
    async fn record_attempt(&self, record: &AttemptRecord, result: AttemptResult, now: Timestamp) -> Result<bool>;
}
