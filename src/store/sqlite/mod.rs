//! The store on SQLite, embedded: the default. One writer thread with group commit (`writer.rs`) runs
//! the frequent writes; the rest go through one writer connection, and reads through a small pool of
//! read-only connections, which WAL lets run beside the writer.

mod purge;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use sqlx::sqlite::{SqlitePool, SqlitePoolOptions};
use sqlx::{Executor, Sqlite, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::group::{ClaimFor, MAX_BATCH, Write};
use super::rows::*;
use super::*;

/// The file a `sqlite:` URL names (without its `?options`); `None` for other stores and for an
/// in-memory SQLite database, which names no file.
pub fn sqlite_file(url: &str) -> Option<&str> {
    let path = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    path.split('?').next().filter(|p| !p.is_empty() && !p.contains(":memory:"))
}

/// Keeps a second `jobhook serve` off a SQLite file this process serves: two would both resume the
/// same work, polling jobs and sending deliveries twice. The lock is an advisory `flock` on a file
/// beside the database (`<file>.lock`; not the database itself, whose locks SQLite manages), held
/// until the returned file is dropped or the process ends, however it ends. `None` for PostgreSQL,
/// where several instances share the work by design.
pub fn lock_sqlite_for_serving(url: &str) -> Result<Option<std::fs::File>, String> {
    let Some(path) = sqlite_file(url) else {
        return Ok(None);
    };
    let lock_path = format!("{path}.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("cannot open the lock file {lock_path}: {e}"))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "another jobhook is already serving {path} (it holds {lock_path}). Run one `jobhook serve` per \
             SQLite file; to run several instances, use PostgreSQL"
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(format!("cannot lock {lock_path}: {e}")),
    }
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

/// The store in a SQLite file.
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    /// The group-committed writes go to the writer thread (see `writer.rs`).
    writes: mpsc::Sender<Write>,
    /// Write transactions started (group-committed batches included), and the writer's busy time.
    stats: Arc<WriterStats>,
    /// When (Unix ms) the last group-committed write failed as unavailable (disk full, read-only…), if
    /// none has succeeded since; 0 otherwise. `ping` reports it for [`WRITE_TROUBLE_FOR`].
    write_trouble: Arc<std::sync::atomic::AtomicI64>,
    /// Who this process is when it claims deliveries: one process serves a file at a time (see
    /// `lock_sqlite_for_serving`), so always the same name, and a restart takes its predecessor's claims
    /// over at once.
    instance: Arc<str>,
}

impl SqliteStore {
    pub async fn open(url: &str, stats: Arc<WriterStats>) -> Result<Self> {
        // WAL with synchronous=FULL, so a commit is fsynced before we answer and survives a power cut as
        // well as kill -9.
        let Some(path) = sqlite_file(url).map(str::to_owned) else {
            return Err(StoreError::BadUrl("in-memory SQLite stores are not supported: name a file"));
        };
        let separator = if url.contains('?') { '&' } else { '?' };
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(BUSY_TIMEOUT)
            .after_connect(sqlite_pragmas)
            .connect(&format!("{url}{separator}mode=rwc"))
            .await
            .map_err(classify)?;
        // Before the first table exists, so a new store hands pages freed by the retention purge back to
        // the file system (`reclaim_space`); on an existing store this does nothing (see README).
        writer.execute("PRAGMA auto_vacuum = INCREMENTAL").await.map_err(classify)?;
        migrator(sqlx::migrate!("src/store/migrations/sqlite"))
            .run(&writer)
            .await
            .map_err(|e| StoreError::Migrate(Arc::new(e)))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(BUSY_TIMEOUT)
            .after_connect(sqlite_pragmas)
            .connect(&format!("{url}{separator}mode=ro"))
            .await
            .map_err(classify)?;
        let (writes, queue) = mpsc::channel(8 * MAX_BATCH);
        writer::spawn(path, queue, stats.clone()).map_err(|e| StoreError::Unavailable(Arc::new(e)))?;
        Ok(SqliteStore { writer, reader, writes, stats, write_trouble: Default::default(), instance: "local".into() })
    }

    /// Queues a group-committed write and waits for its result (after its transaction committed).
    async fn write<T>(&self, write: Write, answer: oneshot::Receiver<Result<T>>) -> Result<T> {
        let gone = || StoreError::trouble(Trouble::WriterGone);
        let queued = std::time::Instant::now();
        self.writes.send(write).await.map_err(|_| gone())?;
        let done = answer.await.map_err(|_| gone())?;
        self.stats.write_seconds.observe(queued.elapsed().as_secs_f64());
        let trouble = if matches!(done, Err(StoreError::Unavailable(_))) { now_ms() } else { 0 };
        self.write_trouble.store(trouble, std::sync::atomic::Ordering::Relaxed);
        done
    }

    async fn begin(&self) -> Result<Transaction<'static, Sqlite>> {
        self.stats.transactions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Take the write lock at BEGIN: a transaction that reads first and writes second would otherwise
        // fail at once (SQLITE_BUSY) whenever the group-commit writer committed in between, while one
        // that waits for the lock up front simply waits its turn.
        self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(classify)
    }
}

/// The settings every SQLite connection gets (see [`SqlStore::open`]).
fn sqlite_pragmas(
    conn: &mut sqlx::SqliteConnection,
    _: sqlx::pool::PoolConnectionMetadata,
) -> futures_util::future::BoxFuture<'_, std::result::Result<(), sqlx::Error>> {
    Box::pin(async move {
        conn.execute("PRAGMA journal_mode = WAL").await?;
        conn.execute("PRAGMA synchronous = FULL").await?;
        conn.execute("PRAGMA busy_timeout = 10000").await?;
        conn.execute("PRAGMA foreign_keys = ON").await?;
        Ok(())
    })
}

/// Sorts a database error into "try again later" (the disk, the file, a lock) and the rest.
fn classify(e: sqlx::Error) -> StoreError {
    let unavailable = match &e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        // SQLite primary result codes: BUSY 5, LOCKED 6, NOMEM 7, READONLY 8, IOERR 10, FULL 13,
        // CANTOPEN 14, PROTOCOL 15.
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            matches!(code.parse::<i64>().map(|c| c & 0xff), Ok(5 | 6 | 7 | 8 | 10 | 13 | 14 | 15))
        }
        _ => false,
    };
    if unavailable { StoreError::Unavailable(Arc::new(e)) } else { StoreError::Other(Arc::new(e)) }
}

trait Classify<T> {
    fn db(self) -> Result<T>;
}

impl<T> Classify<T> for std::result::Result<T, sqlx::Error> {
    fn db(self) -> Result<T> {
        self.map_err(classify)
    }
}

#[allow(dead_code)]
async fn subscription_in(tx: &mut Transaction<'static, Sqlite>, id: &str) -> Result<Subscription> {
    let sql = concat!(
        "SELECT ",
        subscription_columns!(),
        " FROM subscriptions s JOIN jobs j ON j.job_id = s.job_id WHERE s.id = ?"
    );
    let row: SubscriptionRow = sqlx::query_as(sql).bind(id).fetch_one(&mut **tx).await.db()?;
    row.try_into()
}

async fn pollable_in(tx: &mut Transaction<'static, Sqlite>, job_id: &str) -> Result<Option<PollableJob>> {
    let sql = concat!(pollable_select!(), " WHERE j.job_id = ? GROUP BY j.job_id");
    let row: Option<PollableRow> = sqlx::query_as(sql).bind(job_id).fetch_optional(&mut **tx).await.db()?;
    row.map(PollableJob::try_from).transpose()
}

#[async_trait]
impl Store for SqliteStore {
    async fn sync_configured_keys(
        &self,
        keys: &[KeyHash],
        secret: Option<&SigningSecret>,
        now: Millis,
    ) -> Result<ConfiguredKeys> {
        let mut tx = self.begin().await?;
        let mut sync = ConfiguredKeys::default();
        // Configured keys that left the configuration stop working; those listed again work again,
        // unless `jobhook keys revoke` revoked them: that stays.
        let configured: Vec<(i64, Vec<u8>, Option<String>)> =
            sqlx::query_as("SELECT id, key_hash, revoked_by FROM api_keys WHERE source = 'config'")
                .fetch_all(&mut *tx)
                .await
                .db()?;
        for (id, hash, revoked_by) in configured {
            let still = keys.iter().any(|k| k.0.as_slice() == hash.as_slice());
            if still && revoked_by.as_deref() == Some("command") {
                sync.revoked_by_command.push(id);
                continue;
            }
            let sql = if still {
                "UPDATE api_keys SET revoked_at = NULL, revoked_by = NULL WHERE id = ?"
            } else {
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?), revoked_by = COALESCE(revoked_by, 'config') WHERE id = ?"
            };
            let query = sqlx::query(sql);
            let query = if still { query } else { query.bind(now) };
            query.bind(id).execute(&mut *tx).await.db()?;
        }
        // The configured secret is applied when it changes, not at every start: a rotation through the
        // API since then is kept.
        let fingerprint = secret.map(|s| Sha256::digest(s.bytes()).to_vec());
        let applied: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT value FROM meta WHERE key = 'configured_signing_secret'")
                .fetch_optional(&mut *tx)
                .await
                .db()?;
        let secret_changed = fingerprint.is_some() && fingerprint != applied;
        if let Some(fingerprint) = fingerprint.as_ref().filter(|_| secret_changed) {
            sqlx::query(
                "INSERT INTO meta (key, value) VALUES ('configured_signing_secret', ?) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .bind(fingerprint.as_slice())
            .execute(&mut *tx)
            .await
            .db()?;
        }
        for (i, key) in keys.iter().enumerate() {
            let tenant: Option<i64> = sqlx::query_scalar("SELECT tenant_id FROM api_keys WHERE key_hash = ?")
                .bind(key.0.as_slice())
                .fetch_optional(&mut *tx)
                .await
                .db()?;
            match tenant {
                Some(tenant_id) => {
                    if let Some(secret) = secret.filter(|_| secret_changed) {
                        sqlx::query("UPDATE tenants SET signing_secret = ? WHERE id = ?")
                            .bind(secret.expose())
                            .bind(tenant_id)
                            .execute(&mut *tx)
                            .await
                            .db()?;
                    }
                }
                None => {
                    let secret = secret.cloned().unwrap_or_else(SigningSecret::generate);
                    let name = format!("configured key {}", i + 1);
                    insert_tenant_with_key(&mut tx, &name, *key, &secret, "config", now).await?;
                    sync.created += 1;
                }
            }
        }
        tx.commit().await.db()?;
        Ok(sync)
    }

    async fn create_key(&self, name: &str, key: KeyHash, secret: &SigningSecret, now: Millis) -> Result<i64> {
        let mut tx = self.begin().await?;
        let id = insert_tenant_with_key(&mut tx, name, key, secret, "stored", now).await?;
        tx.commit().await.db()?;
        Ok(id)
    }

    async fn add_key(&self, tenant_id: i64, name: &str, key: KeyHash, now: Millis) -> Result<Option<i64>> {
        let mut tx = self.begin().await?;
        let tenant: Option<i64> = sqlx::query_scalar("SELECT id FROM tenants WHERE id = ?")
            .bind(tenant_id)
            .fetch_optional(&mut *tx)
            .await
            .db()?;
        if tenant.is_none() {
            return Ok(None);
        }
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO api_keys (tenant_id, name, key_hash, source, created_at) VALUES (?, ?, ?, 'stored', ?) \
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
        sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL").fetch_one(&self.reader).await.db()
    }

    async fn tenant_by_key(&self, key: KeyHash) -> Result<Option<Tenant>> {
        let row: Option<(i64, String)> = sqlx::query_as(
            "SELECT t.id, t.signing_secret FROM api_keys k JOIN tenants t ON t.id = k.tenant_id \
             WHERE k.key_hash = ? AND k.revoked_at IS NULL",
        )
        .bind(key.0.as_slice())
        .fetch_optional(&self.reader)
        .await
        .db()?;
        row.map(|(id, secret)| Ok(Tenant { id, secret: Arc::new(parse_secret(&secret)?) })).transpose()
    }

    async fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        let rows: Vec<(i64, i64, String, String, i64, Option<i64>)> =
            sqlx::query_as("SELECT id, tenant_id, name, source, created_at, revoked_at FROM api_keys ORDER BY id")
                .fetch_all(&self.reader)
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
            "UPDATE api_keys SET revoked_at = ?, revoked_by = 'command' WHERE id = ? AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(id)
        .execute(&self.writer)
        .await
        .db()?;
        Ok(done.rows_affected() == 1)
    }

    async fn signing_secrets(&self, tenant_id: i64, now: Millis) -> Result<Vec<SigningSecret>> {
        let row: Option<(String, Option<String>, Option<i64>)> =
            sqlx::query_as("SELECT signing_secret, previous_secret, previous_until FROM tenants WHERE id = ?")
                .bind(tenant_id)
                .fetch_optional(&self.reader)
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
        sqlx::query(
            "UPDATE tenants SET previous_secret = signing_secret, previous_until = ?, signing_secret = ? WHERE id = ?",
        )
        .bind(previous_until)
        .bind(new.expose())
        .bind(tenant_id)
        .execute(&self.writer)
        .await
        .db()?;
        Ok(())
    }

    async fn meta_secret(&self, name: &str) -> Result<Vec<u8>> {
        sqlx::query("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING")
            .bind(name)
            .bind(rand::random::<[u8; 32]>().as_slice())
            .execute(&self.writer)
            .await
            .db()?;
        sqlx::query_scalar("SELECT value FROM meta WHERE key = ?").bind(name).fetch_one(&self.writer).await.db()
    }

    async fn redeliver(&self, tenant_id: i64, id: SubscriptionId, now: Millis) -> Result<Option<Redelivery>> {
        let sub_id = id.to_string();
        let mut tx = self.begin().await?;
        let sql = concat!(delivery_select!(), " WHERE s.id = ? AND s.tenant_id = ?");
        let row: Option<DeliveryRow> =
            sqlx::query_as(sql).bind(&sub_id).bind(tenant_id).fetch_optional(&mut *tx).await.db()?;
        let Some(row) = row else { return Ok(None) };
        let state: String = sqlx::query_scalar("SELECT state FROM subscriptions WHERE id = ?")
            .bind(&sub_id)
            .fetch_one(&mut *tx)
            .await
            .db()?;
        let state: SubscriptionState = state.parse().map_err(|e| corrupt("state", e))?;
        if !matches!(state, SubscriptionState::Delivered | SubscriptionState::Failed)
            || row.result.is_none()
            || row.webhook_id.is_none()
        {
            return Ok(Some(Redelivery::NotEnded(state)));
        }
        // A failed subscription may have been followed by a new registration of the same job and
        // callback; two live deliveries of one job to one callback would be one too many.
        let newer: Option<i64> = sqlx::query_scalar(
            "SELECT CAST(1 AS BIGINT) FROM subscriptions s JOIN subscriptions o ON o.tenant_id = s.tenant_id AND o.job_id = s.job_id \
             AND o.callback_url = s.callback_url AND o.id <> s.id AND o.state IN ('polling', 'delivering', 'delivered') \
             WHERE s.id = ?",
        )
        .bind(&sub_id)
        .fetch_optional(&mut *tx)
        .await
        .db()?;
        if newer.is_some() {
            return Ok(Some(Redelivery::Superseded));
        }
        // Conditional, and the series comes back from the row: two redeliveries at once start two series,
        // each task with its own number.
        let series: Option<i64> = sqlx::query_scalar(
            "UPDATE subscriptions SET state = 'delivering', series = series + 1, attempts = 0, failure_reason = NULL, \
             next_attempt_at = ?1, updated_at = ?1 WHERE id = ?2 AND state IN ('delivered', 'failed') RETURNING series",
        )
        .bind(now)
        .bind(&sub_id)
        .fetch_optional(&mut *tx)
        .await
        .db()?;
        let Some(series) = series else {
            return Ok(Some(Redelivery::NotEnded(state)));
        };
        tx.commit().await.db()?;
        let mut task = DeliveryTask::try_from(row)?;
        task.series = u32::try_from(series).unwrap_or(u32::MAX);
        task.attempts_made = 0;
        task.due_at = now;
        Ok(Some(Redelivery::Started(task)))
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
            " FROM subscriptions s JOIN jobs j ON j.job_id = s.job_id WHERE s.id = ? AND s.tenant_id = ?"
        );
        let row: Option<SubscriptionRow> =
            sqlx::query_as(sql).bind(id.to_string()).bind(tenant_id).fetch_optional(&self.reader).await.db()?;
        row.map(Subscription::try_from).transpose()
    }

    async fn list_subscriptions(&self, tenant_id: i64, filter: &ListFilter) -> Result<Vec<Subscription>> {
        let sql = list_query(filter);
        let (values, limit) = list_binds(filter);
        let mut query = sqlx::query_as::<_, SubscriptionRow>(sqlx::AssertSqlSafe(sql)).bind(tenant_id);
        for value in values {
            query = query.bind(value);
        }
        let rows = query.bind(limit).fetch_all(&self.reader).await.db()?;
        rows.into_iter().map(Subscription::try_from).collect()
    }

    async fn cancel(&self, tenant_id: i64, id: SubscriptionId, now: Millis) -> Result<Option<Cancel>> {
        let sub_id = id.to_string();
        let mut tx = self.begin().await?;
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT job_id, state FROM subscriptions WHERE id = ? AND tenant_id = ?")
                .bind(&sub_id)
                .bind(tenant_id)
                .fetch_optional(&mut *tx)
                .await
                .db()?;
        let Some((job_id, state)) = row else {
            return Ok(None);
        };
        let job_id: JobId = job_id.parse().map_err(|e| corrupt("job id", e))?;
        let was: SubscriptionState = state.parse().map_err(|e| corrupt("state", e))?;
        if was.is_final() {
            return Ok(Some(Cancel::Ended(was)));
        }
        // Not while an attempt holds the claim: it may be on the wire, and a subscription that reads
        // `cancelled` must never have been delivered. The claim is read on the clock that set it.
        let changed = sqlx::query("UPDATE subscriptions SET state = 'cancelled', next_attempt_at = NULL, claimed_until = NULL, claimed_by = NULL, \
             updated_at = ?1 WHERE id = ?2 AND state IN ('polling', 'delivering') \
             AND (claimed_until IS NULL OR claimed_until <= ?1)")
        .bind(now)
        .bind(&sub_id)
        .execute(&mut *tx)
        .await
        .db()?;
        if changed.rows_affected() == 0 {
            // Claimed, or (PostgreSQL: the read above takes no lock) ended since. A live subscription here
            // is held by an attempt (or its claim lapsed a moment ago): the caller asks again shortly.
            let state: String = sqlx::query_scalar("SELECT state FROM subscriptions WHERE id = ?")
                .bind(&sub_id)
                .fetch_one(&mut *tx)
                .await
                .db()?;
            let state: SubscriptionState = state.parse().map_err(|e| corrupt("state", e))?;
            return Ok(Some(if state.is_final() { Cancel::Ended(state) } else { Cancel::AttemptInFlight }));
        }
        tx.commit().await.db()?;
        Ok(Some(Cancel::Cancelled { job_id, was }))
    }

    async fn attempts(&self, tenant_id: i64, id: SubscriptionId) -> Result<Option<Vec<AttemptRecord>>> {
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT CAST(1 AS BIGINT) FROM subscriptions WHERE id = ? AND tenant_id = ?")
                .bind(id.to_string())
                .bind(tenant_id)
                .fetch_optional(&self.reader)
                .await
                .db()?;
        if exists.is_none() {
            return Ok(None);
        }
        let rows: Vec<(i64, i64, String, i64, Option<i64>, Option<String>, i64)> = sqlx::query_as(
            "SELECT series, attempt, webhook_id, started_at, status_code, error, duration_ms FROM delivery_attempts \
             WHERE subscription_id = ? ORDER BY id",
        )
        .bind(id.to_string())
        .fetch_all(&self.reader)
        .await
        .db()?;
        Ok(Some(
            rows.into_iter()
                .map(|(series, attempt, webhook_id, started_at, status_code, error, duration_ms)| AttemptRecord {
                    subscription_id: id,
                    partition: 0,
                    series: u32::try_from(series).unwrap_or(1),
                    attempt: u32::try_from(attempt).unwrap_or(0),
                    webhook_id,
                    started_at,
                    status_code: status_code.and_then(|c| u16::try_from(c).ok()),
                    error,
                    duration_ms: u64::try_from(duration_ms).unwrap_or(0),
                })
                .collect(),
        ))
    }

    async fn pollable_jobs(&self) -> Result<Vec<PollableJob>> {
        let sql = concat!(pollable_select!(), " GROUP BY j.job_id");
        let rows: Vec<PollableRow> = sqlx::query_as(sql).fetch_all(&self.reader).await.db()?;
        rows.into_iter().map(PollableJob::try_from).collect()
    }

    async fn pollable_job(&self, job_id: JobId) -> Result<Option<PollableJob>> {
        let sql = concat!(pollable_select!(), " WHERE j.job_id = ? GROUP BY j.job_id");
        let row: Option<PollableRow> =
            sqlx::query_as(sql).bind(job_id.to_string()).fetch_optional(&self.reader).await.db()?;
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
        sqlx::query("UPDATE jobs SET last_error = ?, updated_at = ? WHERE job_id = ?")
            .bind(last_error)
            .bind(now)
            .bind(&job)
            .execute(&mut *tx)
            .await
            .db()?;
        let done = sqlx::query("UPDATE subscriptions SET state = 'failed', failure_reason = ?, updated_at = ? WHERE job_id = ? AND state = 'polling'")
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
        let expired = sqlx::query("UPDATE subscriptions SET state = 'expired', updated_at = ? WHERE job_id = ? AND state = 'polling' AND created_at <= ?")
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
        // Kept by triggers with every change (migration 0005): six rows, not a count of the table.
        sqlx::query_as("SELECT state, n FROM subscription_counts").fetch_all(&self.reader).await.db()
    }

    async fn purge_ended(&self, ended_before: Millis, limit: u32) -> Result<Option<Purged>> {
        // One process serves a SQLite file: nobody else purges it (but `jobhook purge`, which then
        // simply takes turns for the write lock).
        self.purge_batch(ended_before, limit).await.map(Some)
    }

    async fn purgeable(&self, ended_before: Millis) -> Result<Purged> {
        self.count_purgeable(ended_before).await
    }

    async fn reclaim_space(&self) -> Result<()> {
        self.vacuum_freed_pages().await
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT COUNT(*) FROM meta").execute(&self.reader).await.db()?;
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
        false
    }

    fn notices(&self, _: tokio_util::sync::CancellationToken) -> Option<mpsc::Receiver<Heard>> {
        None
    }

    async fn clock(&self) -> Result<Millis> {
        // One process, one clock.
        Ok(now_ms())
    }

    async fn heartbeat(&self, instance: &str, now: Millis, live_after: Millis) -> Result<i64> {
        sqlx::query(
            "INSERT INTO instances (id, heartbeat_at) VALUES (?1, ?2) \
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        )
        .bind(instance)
        .bind(now)
        .execute(&self.writer)
        .await
        .db()?;
        // Instances silent for ten times the liveness window are gone for good.
        sqlx::query("DELETE FROM instances WHERE heartbeat_at < ?")
            .bind(live_after - 10 * (now - live_after))
            .execute(&self.writer)
            .await
            .db()?;
        sqlx::query_scalar("SELECT COUNT(*) FROM instances WHERE heartbeat_at > ?")
            .bind(live_after)
            .fetch_one(&self.writer)
            .await
            .db()
    }

    async fn renew_leases(&self, instance: &str, until: Millis) -> Result<u64> {
        let held: Vec<i64> = sqlx::query_scalar("UPDATE leases SET expires_at = ? WHERE owner = ? RETURNING partition")
            .bind(until)
            .bind(instance)
            .fetch_all(&self.writer)
            .await
            .db()?;
        Ok(mask_of(&held))
    }

    async fn claim_leases(&self, instance: &str, n: i64, now: Millis, until: Millis) -> Result<u64> {
        // SKIP LOCKED: two instances claiming at once take different partitions, neither waits.
        let taken: Vec<i64> = sqlx::query_scalar(
            "UPDATE leases SET owner = ?1, expires_at = ?3 WHERE partition IN \
             (SELECT partition FROM leases WHERE owner IS NULL OR expires_at < ?2 ORDER BY random() LIMIT ?4) \
             RETURNING partition",
        )
        .bind(instance)
        .bind(now)
        .bind(until)
        .bind(n)
        .fetch_all(&self.writer)
        .await
        .db()?;
        Ok(mask_of(&taken))
    }

    async fn release_leases(&self, instance: &str, partitions: u64) -> Result<()> {
        sqlx::query("UPDATE leases SET owner = NULL, expires_at = 0 WHERE owner = ? AND ((? >> CAST(partition AS INTEGER)) & 1) = 1",)
        .bind(instance)
        .bind(partitions as i64)
        .execute(&self.writer)
        .await
        .db()?;
        Ok(())
    }

    async fn leave(&self, instance: &str) -> Result<()> {
        // Our workers have stopped: the claims they took for deliveries they did not get to (or that
        // will be retried) are let go, so the next owner need not wait for them to lapse.
        sqlx::query("UPDATE subscriptions SET claimed_until = NULL, claimed_by = NULL WHERE state = 'delivering' AND claimed_by = ?",)
        .bind(&*self.instance)
        .execute(&self.writer)
        .await
        .db()?;
        self.release_leases(instance, u64::MAX).await?;
        sqlx::query("DELETE FROM instances WHERE id = ?").bind(instance).execute(&self.writer).await.db()?;
        Ok(())
    }

    async fn pollable_jobs_in(&self, partitions: u64) -> Result<Vec<PollableJob>> {
        let sql = concat!(pollable_select!(), " WHERE ((? >> CAST(j.partition AS INTEGER)) & 1) = 1 GROUP BY j.job_id");
        let rows: Vec<PollableRow> = sqlx::query_as(sql).bind(partitions as i64).fetch_all(&self.reader).await.db()?;
        rows.into_iter().map(PollableJob::try_from).collect()
    }

    async fn pending_deliveries_in(&self, partitions: u64) -> Result<Vec<DeliveryTask>> {
        let sql = concat!(
            delivery_select!(),
            " WHERE s.state = 'delivering' AND ((? >> CAST(s.partition AS INTEGER)) & 1) = 1"
        );
        let rows: Vec<DeliveryRow> = sqlx::query_as(sql).bind(partitions as i64).fetch_all(&self.reader).await.db()?;
        rows.into_iter().map(DeliveryTask::try_from).collect()
    }

    async fn delivery_task(&self, id: SubscriptionId) -> Result<Option<DeliveryTask>> {
        let sql = concat!(delivery_select!(), " WHERE s.state = 'delivering' AND s.id = ?");
        let row: Option<DeliveryRow> =
            sqlx::query_as(sql).bind(id.to_string()).fetch_optional(&self.reader).await.db()?;
        row.map(DeliveryTask::try_from).transpose()
    }

    async fn pending_deliveries(&self) -> Result<Vec<DeliveryTask>> {
        let sql = concat!(delivery_select!(), " WHERE s.state = 'delivering'");
        let rows: Vec<DeliveryRow> = sqlx::query_as(sql).fetch_all(&self.reader).await.db()?;
        rows.into_iter().map(DeliveryTask::try_from).collect()
    }

    async fn record_attempt(&self, record: &AttemptRecord, result: AttemptResult, now: Millis) -> Result<bool> {
        let (reply, answer) = oneshot::channel();
        self.write(Write::Attempt { record: record.clone(), result, now, reply }, answer).await
    }
}

async fn insert_tenant_with_key(
    tx: &mut Transaction<'static, Sqlite>,
    name: &str,
    key: KeyHash,
    secret: &SigningSecret,
    source: &str,
    now: Millis,
) -> Result<i64> {
    let tenant_id: i64 =
        sqlx::query_scalar("INSERT INTO tenants (name, signing_secret, created_at) VALUES (?, ?, ?) RETURNING id")
            .bind(name)
            .bind(secret.expose())
            .bind(now)
            .fetch_one(&mut **tx)
            .await
            .db()?;
    sqlx::query("INSERT INTO api_keys (tenant_id, name, key_hash, source, created_at) VALUES (?, ?, ?, ?, ?)")
        .bind(tenant_id)
        .bind(name)
        .bind(key.0.as_slice())
        .bind(source)
        .bind(now)
        .execute(&mut **tx)
        .await
        .db()?;
    Ok(tenant_id)
}
