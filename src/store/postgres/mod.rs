//! The store on PostgreSQL, where several instances share one database: sqlx's native `PgPool`, every
//! statement written once in PostgreSQL's own SQL and prepared once per connection (sqlx caches them),
//! the group-committed writes in lanes (see `writer.rs`), and notices between instances (`notice.rs`).

mod api;
mod complete;
mod keys;
mod leases;
mod notice;
mod purge;
mod register;
mod retry_now;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Executor, Postgres, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::group::{ClaimFor, Write};
use super::rows::*;
use super::*;

use keys::insert_tenant_with_key;
pub use notice::Notice;

/// How long a write batch may wait for PostgreSQL before it is abandoned (see [`writer`]).
const BATCH_DEADLINE: Duration = Duration::from_secs(15);

/// What every PostgreSQL connection is told at connect: no statement runs longer than
/// `statement_timeout`, none waits for a lock longer than `lock_timeout` (our transactions are short;
/// a longer wait is a stuck peer), a transaction left idle is ended, and the server probes an idle client
/// with TCP keepalives, so a client that vanished releases its locks within about a minute.
const PG_SESSION: &str = "SET statement_timeout = '30s'; SET lock_timeout = '10s'; \
     SET idle_in_transaction_session_timeout = '60s'; SET tcp_keepalives_idle = 30; \
     SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3";

/// The database's clock in Unix milliseconds (PostgreSQL), the one clock every instance's claims are
/// read from (as for leases).
macro_rules! pg_now_ms {
    () => {
        "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
    };
}

/// How long `ping` reports a failed write (unless a write succeeds before).
const WRITE_TROUBLE_FOR: Duration = Duration::from_secs(10);

/// How long a statement waits for a connection or a lock before giving up with "unavailable".
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Migrations only ever add (columns, tables, indexes), so a binary may run on a database that a newer
/// one has already migrated further: during a rolling upgrade an old instance that restarts must not
/// refuse to start over a migration it does not know.
fn migrator(mut migrator: sqlx::migrate::Migrator) -> sqlx::migrate::Migrator {
    migrator.set_ignore_missing(true);
    migrator
}

/// The store on a PostgreSQL server.
pub struct PgStore {
    pool: PgPool,
    /// The group-committed writes go to the writer lanes (see [`writer`]); all writes about one job go
    /// to the same one.
    writes: Vec<mpsc::Sender<Write>>,
    /// Write transactions started (group-committed batches included), and the writers' busy time.
    stats: Arc<WriterStats>,
    /// When (Unix ms) the last group-committed write failed as unavailable, if none has succeeded
    /// since; 0 otherwise. `ping` reports it for [`WRITE_TROUBLE_FOR`].
    write_trouble: Arc<std::sync::atomic::AtomicI64>,
    /// Who this process is when it claims deliveries: a new name per process.
    instance: Arc<str>,
    /// Where to listen for notices (see [`Store::notices`]).
    url: String,
    /// The notices we sent, so our own listener skips them.
    sent: Arc<notice::Sent>,
}

/// How many writer lanes: PostgreSQL commits several transactions at once, and each statement waits a
/// network round trip, so several lanes keep its connections busy.
const LANES: usize = 8;

impl PgStore {
    pub async fn open(url: &str, stats: Arc<WriterStats>) -> Result<Self> {
        // One direct connection first: a pool that cannot connect says only "pool timed out" after its
        // timeout, where this says why at once (refused, wrong password, no such database).
        let mut probe = tokio::time::timeout(BUSY_TIMEOUT, <sqlx::PgConnection as sqlx::Connection>::connect(url))
            .await
            .map_err(|_| StoreError::trouble(Trouble::ConnectTimeout(BUSY_TIMEOUT)))?
            .map_err(|e| match &e {
                // SQLSTATE 3D000 invalid_catalog_name: said plainly rather than as the server's message
                // with its source file and line.
                sqlx::Error::Database(db) if db.code().as_deref() == Some("3D000") => {
                    StoreError::NoDatabase(postgres_database_name(url))
                }
                _ => classify(e),
            })?;
        // Migrations run on this connection, without the pool's statement timeout: an index built by a
        // future migration may take longer.
        migrator(sqlx::migrate!("src/store/migrations/postgres"))
            .run(&mut probe)
            .await
            .map_err(|e| StoreError::Migrate(Arc::new(e)))?;
        let _ = sqlx::Connection::close(probe).await;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(BUSY_TIMEOUT)
            .after_connect(|conn, _| Box::pin(async move { conn.execute(PG_SESSION).await.map(drop) }))
            .connect(url)
            .await
            .map_err(classify)?;
        // Bounded: when the database cannot keep up, callers wait here instead of piling up memory.
        // Each job's writes go to one lane (by partition), so concurrent batches never lock the same rows
        // in opposite orders (no deadlocks).
        let sent = Arc::new(notice::Sent::default());
        let writes = (0..LANES)
            .map(|_| {
                let (writes, queue) = mpsc::channel(8 * group::MAX_BATCH);
                tokio::spawn(writer::run(pool.clone(), queue, stats.clone(), sent.clone()));
                writes
            })
            .collect();
        Ok(PgStore {
            pool,
            writes,
            stats,
            write_trouble: Default::default(),
            instance: uuid::Uuid::new_v4().to_string().into(),
            url: url.to_owned(),
            sent,
        })
    }

    /// Queues a group-committed write and waits for its result (after its transaction committed).
    async fn write<T>(&self, write: Write, answer: oneshot::Receiver<Result<T>>) -> Result<T> {
        let gone = || StoreError::trouble(Trouble::WriterGone);
        let lane = usize::try_from(write.partition()).unwrap_or(0) % self.writes.len();
        let queued = std::time::Instant::now();
        self.writes[lane].send(write).await.map_err(|_| gone())?;
        let done = answer.await.map_err(|_| gone())?;
        self.stats.write_seconds.observe(queued.elapsed().as_secs_f64());
        let trouble = if matches!(done, Err(StoreError::Unavailable(_))) { now_ms() } else { 0 };
        self.write_trouble.store(trouble, std::sync::atomic::Ordering::Relaxed);
        done
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>> {
        self.stats.transactions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.pool.begin().await.map_err(classify)
    }
}
use pg_now_ms;

/// The database a `postgres://` URL names: its path, else its `dbname` parameter, else (as libpq does)
/// the user's name.
fn postgres_database_name(url: &str) -> String {
    let Ok(u) = url::Url::parse(url) else { return "(named in the URL)".into() };
    let path = u.path().trim_start_matches('/');
    if !path.is_empty() {
        return path.to_owned();
    }
    if let Some((_, name)) = u.query_pairs().find(|(k, _)| k == "dbname") {
        return name.into_owned();
    }
    if u.username().is_empty() { "postgres".into() } else { u.username().to_owned() }
}

/// Sorts a database error into "try again later" (the connection, the server, a lock) and the rest.
pub(super) fn classify(e: sqlx::Error) -> StoreError {
    let unavailable = match &e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => true,
        // SQLSTATE classes: 08 connection, 53 insufficient resources (disk full), 57 operator
        // intervention (shutdown, terminated backend), 58 system error; 25006 read-only transaction;
        // 40001/40P01 serialization failure and deadlock.
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            ["08", "53", "57", "58"].iter().any(|class| code.starts_with(class))
                || matches!(code.as_ref(), "25006" | "40001" | "40P01")
        }
        _ => false,
    };
    if unavailable { StoreError::Unavailable(Arc::new(e)) } else { StoreError::Other(Arc::new(e)) }
}

pub(super) trait Classify<T> {
    fn db(self) -> Result<T>;
}

impl<T> Classify<T> for std::result::Result<T, sqlx::Error> {
    fn db(self) -> Result<T> {
        self.map_err(classify)
    }
}

/// Tells the other instances about work they may own: delivered when `tx` commits, or never.
async fn notify(tx: &mut Transaction<'static, Postgres>, sent: &notice::Sent, notice: Notice) -> Result<()> {
    let payload = notice.to_string();
    sent.record([&payload]);
    sqlx::query("SELECT pg_notify('jobhook', $1)").bind(payload).execute(&mut **tx).await.db()?;
    Ok(())
}

pub(super) async fn pollable_in(tx: &mut Transaction<'static, Postgres>, job_id: &str) -> Result<Option<PollableJob>> {
    let sql = concat!(pollable_select!(), " WHERE j.job_id = $1 GROUP BY j.job_id");
    let row: Option<PollableRow> = sqlx::query_as(sql).bind(job_id).fetch_optional(&mut **tx).await.db()?;
    row.map(PollableJob::try_from).transpose()
}

#[async_trait]
impl Store for PgStore {
    async fn sync_configured_keys(
        &self,
        keys: &[KeyHash],
        secret: Option<&SigningSecret>,
        now: Millis,
    ) -> Result<ConfiguredKeys> {
        self.keys_sync(keys, secret, now).await
    }

    async fn create_key(&self, name: &str, key: KeyHash, secret: &SigningSecret, now: Millis) -> Result<i64> {
        let mut tx = self.begin().await?;
        let id = insert_tenant_with_key(&mut tx, name, key, secret, "stored", now).await?;
        tx.commit().await.db()?;
        Ok(id)
    }

    async fn add_key(&self, tenant_id: i64, name: &str, key: KeyHash, now: Millis) -> Result<Option<i64>> {
        let mut tx = self.begin().await?;
        let tenant: Option<i64> = sqlx::query_scalar("SELECT id FROM tenants WHERE id = $1")
            .bind(tenant_id)
            .fetch_optional(&mut *tx)
            .await
            .db()?;
        if tenant.is_none() {
            return Ok(None);
        }
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO api_keys (tenant_id, name, key_hash, source, created_at) VALUES ($1, $2, $3, 'stored', $4) \
             RETURNING id",
        )
        .bind(tenant_id)
        .bind(name)
        .bind(key.0.as_slice())
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .db()?;
        tx.commit().await.db()?;
        Ok(Some(id))
    }

    async fn usable_key_count(&self) -> Result<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL").fetch_one(&self.pool).await.db()
    }

    async fn tenant_by_key(&self, key: KeyHash) -> Result<Option<Tenant>> {
        let row: Option<(i64, String)> = sqlx::query_as(
            "SELECT t.id, t.signing_secret FROM api_keys k JOIN tenants t ON t.id = k.tenant_id \
             WHERE k.key_hash = $1 AND k.revoked_at IS NULL",
        )
        .bind(key.0.as_slice())
        .fetch_optional(&self.pool)
        .await
        .db()?;
        row.map(|(id, secret)| Ok(Tenant { id, secret: Arc::new(parse_secret(&secret)?) })).transpose()
    }

    async fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        let rows: Vec<(i64, i64, String, String, i64, Option<i64>)> =
            sqlx::query_as("SELECT id, tenant_id, name, source, created_at, revoked_at FROM api_keys ORDER BY id")
                .fetch_all(&self.pool)
                .await
                .db()?;
        Ok(rows
            .into_iter()
            .map(|(id, tenant_id, name, source, created_at, revoked_at)| KeyInfo {
                id,
                tenant_id,
                name,
                source,
                created_at,
                revoked_at,
            })
            .collect())
    }

    async fn revoke_key(&self, id: i64, now: Millis) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE api_keys SET revoked_at = $1, revoked_by = 'command' WHERE id = $2 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await
        .db()?;
        Ok(done.rows_affected() == 1)
    }

    async fn signing_secrets(&self, tenant_id: i64, now: Millis) -> Result<Vec<SigningSecret>> {
        let row: Option<(String, Option<String>, Option<i64>)> =
            sqlx::query_as("SELECT signing_secret, previous_secret, previous_until FROM tenants WHERE id = $1")
                .bind(tenant_id)
                .fetch_optional(&self.pool)
                .await
                .db()?;
        let Some((current, previous, until)) = row else {
            return Err(corrupt("delivery of an unknown tenant", tenant_id));
        };
        let mut secrets = vec![parse_secret(&current)?];
        if let (Some(previous), Some(until)) = (previous, until)
            && now < until
        {
            secrets.push(parse_secret(&previous)?);
        }
        Ok(secrets)
    }

    async fn rotate_secret(&self, tenant_id: i64, new: &SigningSecret, previous_until: Millis) -> Result<()> {
        sqlx::query("UPDATE tenants SET previous_secret = signing_secret, previous_until = $1, signing_secret = $2 WHERE id = $3",)
        .bind(previous_until)
        .bind(new.expose())
        .bind(tenant_id)
        .execute(&self.pool)
        .await
        .db()?;
        Ok(())
    }

    async fn meta_secret(&self, name: &str) -> Result<Vec<u8>> {
        sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .bind(name)
            .bind(rand::random::<[u8; 32]>().as_slice())
            .execute(&self.pool)
            .await
            .db()?;
        sqlx::query_scalar("SELECT value FROM meta WHERE key = $1").bind(name).fetch_one(&self.pool).await.db()
    }

    async fn redeliver(&self, tenant_id: i64, id: SubscriptionId, now: Millis) -> Result<Option<Redelivery>> {
        self.redeliver_now(tenant_id, id, now).await
    }

    async fn retry_now(&self, tenant_id: i64, id: SubscriptionId, now: Millis) -> Result<Option<RetryNow>> {
        self.retry_delivery_now(tenant_id, id, now).await
    }

    async fn register(
        &self,
        key: KeyHash,
        id: SubscriptionId,
        job_id: JobId,
        callback_url: &CallbackUrl,
        now: Millis,
    ) -> Result<Registered> {
        let (reply, answer) = oneshot::channel();
        self.write(Write::Register { key, id, job_id, callback_url: callback_url.clone(), now, reply }, answer).await
    }

    async fn subscription(&self, tenant_id: i64, id: SubscriptionId) -> Result<Option<Subscription>> {
        let sql = concat!(
            "SELECT ",
            subscription_columns!(),
            " FROM subscriptions s JOIN jobs j ON j.job_id = s.job_id WHERE s.id = $1 AND s.tenant_id = $2"
        );
        let row: Option<SubscriptionRow> =
            sqlx::query_as(sql).bind(id.to_string()).bind(tenant_id).fetch_optional(&self.pool).await.db()?;
        row.map(Subscription::try_from).transpose()
    }

    async fn list_subscriptions(&self, tenant_id: i64, filter: &ListFilter) -> Result<Vec<Subscription>> {
        let sql = list_query(filter);
        let (values, limit) = list_binds(filter);
        let mut query = sqlx::query_as::<_, SubscriptionRow>(sqlx::AssertSqlSafe(sql)).bind(tenant_id);
        for value in values {
            query = query.bind(value);
        }
        let rows = query.bind(limit).fetch_all(&self.pool).await.db()?;
        rows.into_iter().map(Subscription::try_from).collect()
    }

    async fn cancel(&self, tenant_id: i64, id: SubscriptionId, now: Millis) -> Result<Option<Cancel>> {
        self.cancel_now(tenant_id, id, now).await
    }

    async fn attempts(&self, tenant_id: i64, id: SubscriptionId) -> Result<Option<Vec<AttemptRecord>>> {
        self.attempts_of(tenant_id, id).await
    }

    async fn pollable_jobs(&self) -> Result<Vec<PollableJob>> {
        let sql = concat!(pollable_select!(), " GROUP BY j.job_id");
        let rows: Vec<PollableRow> = sqlx::query_as(sql).fetch_all(&self.pool).await.db()?;
        rows.into_iter().map(PollableJob::try_from).collect()
    }

    async fn pollable_job(&self, job_id: JobId) -> Result<Option<PollableJob>> {
        let sql = concat!(pollable_select!(), " WHERE j.job_id = $1 GROUP BY j.job_id");
        let row: Option<PollableRow> =
            sqlx::query_as(sql).bind(job_id.to_string()).fetch_optional(&self.pool).await.db()?;
        row.map(PollableJob::try_from).transpose()
    }

    async fn record_observation(
        &self,
        job_id: JobId,
        status: Option<JobStatus>,
        last_error: Option<&str>,
        now: Millis,
    ) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        let last_error = last_error.map(str::to_owned);
        self.write(Write::Observe { job_id, status, last_error, now, reply }, answer).await
    }

    async fn complete_job(
        &self,
        job_id: JobId,
        status: JobStatus,
        body: &Bytes,
        now: Millis,
        claim_for: Duration,
    ) -> Result<Vec<DeliveryTask>> {
        let (reply, answer) = oneshot::channel();
        let claim = ClaimFor::new(&self.instance, claim_for);
        self.write(Write::Complete { job_id, status, body: body.clone(), now, claim, reply }, answer).await
    }

    async fn claim_delivery(&self, task: &DeliveryTask, claim_for: Duration) -> Result<Claim> {
        let (reply, answer) = oneshot::channel();
        let claim = ClaimFor::new(&self.instance, claim_for);
        let write = Write::Claim {
            id: task.subscription_id,
            partition: task.partition,
            series: task.series,
            now: now_ms(),
            claim,
            reply,
        };
        self.write(write, answer).await
    }

    async fn fail_job(&self, job_id: JobId, reason: FailureReason, last_error: &str, now: Millis) -> Result<u64> {
        let job = job_id.to_string();
        let mut tx = self.begin().await?;
        sqlx::query("UPDATE jobs SET last_error = $1, updated_at = $2 WHERE job_id = $3")
            .bind(last_error)
            .bind(now)
            .bind(&job)
            .execute(&mut *tx)
            .await
            .db()?;
        let done = sqlx::query("UPDATE subscriptions SET state = 'failed', failure_reason = $1, updated_at = $2 WHERE job_id = $3 AND state = 'polling'")
            .bind(reason.as_str())
            .bind(now)
            .bind(&job)
            .execute(&mut *tx)
            .await
            .db()?;
        tx.commit().await.db()?;
        Ok(done.rows_affected())
    }

    async fn expire(&self, job_id: JobId, cutoff: Millis, now: Millis) -> Result<(u64, Option<PollableJob>)> {
        let job = job_id.to_string();
        let mut tx = self.begin().await?;
        let expired = sqlx::query("UPDATE subscriptions SET state = 'expired', updated_at = $1 WHERE job_id = $2 AND state = 'polling' AND created_at <= $3")
            .bind(now)
            .bind(&job)
            .bind(cutoff)
            .execute(&mut *tx)
            .await
            .db()?;
        let left = pollable_in(&mut tx, &job).await?;
        tx.commit().await.db()?;
        Ok((expired.rows_affected(), left))
    }

    async fn count_by_state(&self) -> Result<Vec<(String, i64)>> {
        self.state_counts().await
    }

    async fn purge_ended(&self, ended_before: Millis, limit: u32) -> Result<Option<Purged>> {
        self.purge_batch(ended_before, limit).await
    }

    async fn purgeable(&self, ended_before: Millis) -> Result<Purged> {
        self.count_purgeable(ended_before).await
    }

    async fn reclaim_space(&self) -> Result<()> {
        // Autovacuum makes the space of deleted rows reusable by itself.
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT COUNT(*) FROM meta").execute(&self.pool).await.db()?;
        // Writes failing lately (and none going through since) is not ready either. The mark lapses on
        // its own, so an idle instance whose disk recovered becomes ready without writing anything; if
        // the disk is still full, the next write marks it again.
        let failed_at = self.write_trouble.load(std::sync::atomic::Ordering::Relaxed);
        if failed_at > 0 && now_ms() - failed_at < WRITE_TROUBLE_FOR.as_millis() as Millis {
            return Err(StoreError::trouble(Trouble::WritesFailing));
        }
        Ok(())
    }

    fn writer_stats(&self) -> Arc<WriterStats> {
        self.stats.clone()
    }

    fn shared(&self) -> bool {
        true
    }

    fn notices(&self, shutdown: tokio_util::sync::CancellationToken) -> Option<mpsc::Receiver<Heard>> {
        Some(notice::listen(self.url.clone(), self.sent.clone(), shutdown))
    }

    async fn clock(&self) -> Result<Millis> {
        sqlx::query_scalar(concat!("SELECT ", pg_now_ms!())).fetch_one(&self.pool).await.db()
    }

    async fn heartbeat(&self, instance: &str, now: Millis, live_after: Millis) -> Result<i64> {
        self.heartbeat_now(instance, now, live_after).await
    }

    async fn renew_leases(&self, instance: &str, until: Millis) -> Result<u64> {
        self.renew_now(instance, until).await
    }

    async fn claim_leases(&self, instance: &str, n: i64, now: Millis, until: Millis) -> Result<u64> {
        self.claim_now(instance, n, now, until).await
    }

    async fn release_leases(&self, instance: &str, partitions: u64) -> Result<()> {
        self.release_now(instance, partitions).await
    }

    async fn leave(&self, instance: &str) -> Result<()> {
        self.leave_now(instance).await
    }

    async fn pollable_jobs_in(&self, partitions: u64) -> Result<Vec<PollableJob>> {
        let sql =
            concat!(pollable_select!(), " WHERE (($1 >> CAST(j.partition AS INTEGER)) & 1) = 1 GROUP BY j.job_id");
        let rows: Vec<PollableRow> = sqlx::query_as(sql).bind(partitions as i64).fetch_all(&self.pool).await.db()?;
        rows.into_iter().map(PollableJob::try_from).collect()
    }

    async fn pending_deliveries_in(&self, partitions: u64) -> Result<Vec<DeliveryTask>> {
        let sql = concat!(
            delivery_select!(),
            " WHERE s.state = 'delivering' AND (($1 >> CAST(s.partition AS INTEGER)) & 1) = 1"
        );
        let rows: Vec<DeliveryRow> = sqlx::query_as(sql).bind(partitions as i64).fetch_all(&self.pool).await.db()?;
        rows.into_iter().map(DeliveryTask::try_from).collect()
    }

    async fn delivery_task(&self, id: SubscriptionId) -> Result<Option<DeliveryTask>> {
        let sql = concat!(delivery_select!(), " WHERE s.state = 'delivering' AND s.id = $1");
        let row: Option<DeliveryRow> =
            sqlx::query_as(sql).bind(id.to_string()).fetch_optional(&self.pool).await.db()?;
        row.map(DeliveryTask::try_from).transpose()
    }

    async fn pending_deliveries(&self) -> Result<Vec<DeliveryTask>> {
        let sql = concat!(delivery_select!(), " WHERE s.state = 'delivering'");
        let rows: Vec<DeliveryRow> = sqlx::query_as(sql).fetch_all(&self.pool).await.db()?;
        rows.into_iter().map(DeliveryTask::try_from).collect()
    }

    async fn record_attempt(&self, record: &AttemptRecord, result: AttemptResult, now: Millis) -> Result<bool> {
        let (reply, answer) = oneshot::channel();
        self.write(Write::Attempt { record: record.clone(), result, now, reply }, answer).await
    }
}
