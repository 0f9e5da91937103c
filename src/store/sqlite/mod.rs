//! The store on SQLite, embedded: the default. rusqlite runs every statement. One writer thread owns the
//! only writing connection: the frequent writes are group-committed there (`writer.rs`), the others run
//! there in a transaction of their own. Reads use a small pool of read-only connections, which WAL lets
//! run beside the writer.

/// The condition "subscription `$s` belongs to the job whose key is bound at `$p`", spelled so that
/// `subscriptions_by_job` serves it: the job's creation time first, read from `jobs` (migration 0011).
macro_rules! of_job {
    ($s:literal, $p:literal) => {
        concat!(
            $s,
            ".job_created_at = (SELECT created_at FROM jobs WHERE job_id = ",
            $p,
            ") AND ",
            $s,
            ".job_id = ",
            $p
        )
    };
}

mod checkpoint;
mod idempotency;
mod migrate;
mod ops;
mod purge;
mod writer;

pub(super) use ops::{bulk_statement, list_statement};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot};

use super::group::{ClaimFor, MAX_BATCH, Write};
use super::rows::*;
use super::*;
use writer::Job;

// Times are INTEGER columns of Unix milliseconds.
impl rusqlite::ToSql for Timestamp {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_millis().into())
    }
}

impl rusqlite::types::FromSql for Timestamp {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        i64::column_result(value).map(Timestamp::from_millis)
    }
}

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

/// How long a statement waits for a lock before giving up with "unavailable".
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Read-only connections kept for reads: reads are few and short (the API's, start-up's), so a few
/// suffice; a read finding none idle opens another, which is kept only while the pool holds fewer.
const READERS: usize = 4;

/// The store in a SQLite file.
pub struct SqliteStore {
    path: String,
    /// Everything that writes goes to the writer thread (see `writer.rs`).
    writes: mpsc::Sender<Job>,
    /// Idle read-only connections. A plain mutex: it is held only to push or pop one, never across a
    /// query.
    readers: Arc<Mutex<Vec<Connection>>>,
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

/// The settings every connection gets: WAL with synchronous=FULL, so a commit is fsynced before we
/// answer and survives a power cut as well as kill -9.
fn configure(conn: &Connection) -> rusqlite::Result<()> {
    // Before the first table exists (and before WAL), so a new store hands the pages freed by the
    // retention purge back to the file system (see `reclaim_space`); on an existing store this changes
    // nothing (README: Retention).
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

fn open_reader(path: &str) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags).sq()?;
    conn.busy_timeout(BUSY_TIMEOUT).sq()?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

impl SqliteStore {
    pub async fn open(url: &str, stats: Arc<WriterStats>) -> Result<Self> {
        let Some(path) = sqlite_file(url).map(str::to_owned) else {
            return Err(StoreError::BadUrl("in-memory SQLite stores are not supported: name a file"));
        };
        let opened = path.clone();
        let (writer, checkpoints) = tokio::task::spawn_blocking(move || -> Result<(Connection, Connection)> {
            let mut conn = Connection::open(&opened).sq()?;
            configure(&conn).sq()?;
            // A store with a long past has indexes of gigabytes, keyed by random IDs: each write touches
            // pages spread all over them, and SQLite's default 2 MB page cache reads most of them back
            // through a system call each. The writer (the one connection that walks them for every job)
            // gets 32 MB; readers keep the default. No memory map: it made no difference to the writer's
            // CPU, and its pages counted in RSS, 250 MB of a store with a million pending jobs (README).
            conn.pragma_update(None, "cache_size", -32_768).sq()?;
            migrate::run(&mut conn)?;
            conn.pragma_update(None, "wal_autocheckpoint", checkpoint::WRITER_CHECKPOINT_PAGES).sq()?;
            let checkpoints = Connection::open(&opened).sq()?;
            configure(&checkpoints).sq()?;
            Ok((conn, checkpoints))
        })
        .await
        .map_err(|e| StoreError::Other(Arc::new(e)))??;
        let unavailable = |e| StoreError::Unavailable(Arc::new(e));
        let checkpointer = checkpoint::Checkpointer::spawn(checkpoints).map_err(unavailable)?;
        let (writes, queue) = mpsc::channel(8 * MAX_BATCH);
        writer::spawn(writer, queue, stats.clone(), checkpointer).map_err(unavailable)?;
        Ok(SqliteStore {
            path,
            writes,
            readers: Default::default(),
            stats,
            write_trouble: Default::default(),
            instance: "local".into(),
        })
    }

    /// Queues a group-committed write and waits for its result (after its transaction committed).
    async fn write<T>(&self, write: Write, answer: oneshot::Receiver<Result<T>>) -> Result<T> {
        let gone = || StoreError::trouble(Trouble::WriterGone);
        let queued = std::time::Instant::now();
        self.writes.send(Job::Group(write)).await.map_err(|_| gone())?;
        let done = answer.await.map_err(|_| gone())?;
        self.stats.write_seconds.observe(queued.elapsed().as_secs_f64());
        let trouble = if matches!(done, Err(StoreError::Unavailable(_))) { Timestamp::now().as_millis() } else { 0 };
        self.write_trouble.store(trouble, std::sync::atomic::Ordering::Relaxed);
        done
    }

    /// Runs `f` on the writer thread in a transaction of its own, committed when it returns `Ok`.
    async fn exec<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.exec_as(false, f).await
    }

    /// [`Self::exec`] for a write that dirties many pages at once (a purge step): WAL checkpoints go
    /// back on the writer meanwhile (see `checkpoint.rs`).
    async fn exec_bulk<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.exec_as(true, f).await
    }

    async fn exec_as<T: Send + 'static>(
        &self,
        bulk: bool,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        let run = Box::new(move |conn: &mut Connection| {
            let done = (|| {
                // IMMEDIATE: the write lock at BEGIN, so a read-then-write never meets SQLITE_BUSY.
                let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).sq()?;
                let value = f(&tx)?;
                tx.commit().sq()?;
                Ok(value)
            })();
            let _ = reply.send(done);
        });
        let job = Job::Alone { run, bulk };
        let gone = || StoreError::trouble(Trouble::WriterGone);
        self.writes.send(job).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Runs `f` on a read-only connection, on a blocking thread.
    async fn read<T: Send + 'static>(&self, f: impl FnOnce(&Connection) -> Result<T> + Send + 'static) -> Result<T> {
        let readers = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let idle = readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let conn = match idle {
                Some(conn) => conn,
                None => open_reader(&path)?,
            };
            let done = f(&conn);
            let mut idle = readers.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < READERS {
                idle.push(conn);
            }
            done
        })
        .await
        .map_err(|e| StoreError::Other(Arc::new(e)))?
    }
}

/// SQLite's "try again later" codes become `Unavailable`: the disk, the file, a lock.
fn classify(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::*;
    let unavailable = matches!(
        e.sqlite_error_code(),
        Some(
            DatabaseBusy
                | DatabaseLocked
                | OutOfMemory
                | ReadOnly
                | SystemIoFailure
                | DiskFull
                | CannotOpen
                | FileLockingProtocolFailed
        )
    );
    if unavailable { StoreError::Unavailable(Arc::new(e)) } else { StoreError::Other(Arc::new(e)) }
}

trait Sq<T> {
    fn sq(self) -> Result<T>;
}

impl<T> Sq<T> for rusqlite::Result<T> {
    fn sq(self) -> Result<T> {
        self.map_err(classify)
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn sync_configured_keys(&self, configured: KeyConfig<'_>, now: Timestamp) -> Result<ConfiguredKeys> {
        let (keys, secret) = (configured.keys.to_vec(), configured.secret.cloned());
        self.exec(move |tx| ops::sync_configured_keys(tx, KeyConfig { keys: &keys, secret: secret.as_ref() }, now))
            .await
    }

    async fn create_key(&self, name: &str, key: KeyHash, secret: &SigningSecret, now: Timestamp) -> Result<i64> {
        let (name, secret) = (name.to_owned(), secret.clone());
        self.exec(move |tx| {
            ops::insert_tenant_with_key(tx, &NewTenant { name: &name, key, secret: &secret, source: "stored" }, now)
        })
        .await
    }

    async fn add_key(&self, tenant_id: i64, name: &str, key: KeyHash, now: Timestamp) -> Result<Option<i64>> {
        let name = name.to_owned();
        self.exec(move |tx| ops::add_key(tx, tenant_id, &name, key, now)).await
    }

    async fn usable_key_count(&self) -> Result<i64> {
        self.read(|c| c.query_row("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL", [], |r| r.get(0)).sq())
            .await
    }

    async fn tenant_by_key(&self, key: KeyHash) -> Result<Option<Tenant>> {
        self.read(move |c| ops::tenant_by_key(c, key)).await
    }

    async fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        self.read(ops::list_keys).await
    }

    async fn revoke_key(&self, id: i64, now: Timestamp) -> Result<bool> {
        self.exec(move |tx| {
            let sql =
                "UPDATE api_keys SET revoked_at = ?1, revoked_by = 'command' WHERE id = ?2 AND revoked_at IS NULL";
            Ok(tx.prepare_cached(sql).sq()?.execute(rusqlite::params![now, id]).sq()? == 1)
        })
        .await
    }

    async fn signing_secrets(&self, tenant_id: i64, now: Timestamp) -> Result<Vec<SigningSecret>> {
        self.read(move |c| ops::signing_secrets(c, tenant_id, now)).await
    }

    async fn rotate_secret(&self, tenant_id: i64, new: &SigningSecret, previous_until: Timestamp) -> Result<()> {
        let new = new.expose().to_owned();
        self.exec(move |tx| {
            let sql = "UPDATE tenants SET previous_secret = signing_secret, previous_until = ?1, signing_secret = ?2 \
                       WHERE id = ?3";
            tx.prepare_cached(sql).sq()?.execute(rusqlite::params![previous_until, new, tenant_id]).sq()?;
            Ok(())
        })
        .await
    }

    async fn meta_secret(&self, name: &str) -> Result<Vec<u8>> {
        let name = name.to_owned();
        self.exec(move |tx| {
            let fresh = rand::random::<[u8; 32]>();
            tx.prepare_cached("INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING")
                .sq()?
                .execute(rusqlite::params![name, fresh.as_slice()])
                .sq()?;
            tx.query_row("SELECT value FROM meta WHERE key = ?1", [&name], |r| r.get(0)).sq()
        })
        .await
    }

    async fn register(&self, registration: Registration) -> Result<Registered> {
        let (write, answer) = Write::register(registration);
        self.write(write, answer).await
    }

    async fn subscription(&self, sub: TenantSub) -> Result<Option<Subscription>> {
        self.read(move |c| ops::subscription(c, sub)).await
    }

    async fn claim_idempotency_key(&self, claim: IdempotencyClaim) -> Result<Claimed> {
        self.exec(move |tx| idempotency::claim(tx, &claim)).await
    }

    async fn finish_idempotency_key(&self, tenant_id: i64, key: &str, answer: &StoredAnswer) -> Result<()> {
        let (key, answer) = (key.to_owned(), answer.clone());
        self.exec(move |tx| idempotency::finish(tx, tenant_id, &key, &answer)).await
    }

    async fn list_subscriptions(&self, tenant_id: i64, filter: &ListFilter) -> Result<Vec<Subscription>> {
        let filter = filter.clone();
        self.read(move |c| ops::list_subscriptions(c, tenant_id, &filter)).await
    }

    async fn cancel(&self, sub: TenantSub, now: Timestamp) -> Result<Option<Cancel>> {
        self.exec(move |tx| ops::cancel(tx, sub, now)).await
    }

    async fn attempts(&self, sub: TenantSub) -> Result<Option<Vec<AttemptRecord>>> {
        self.read(move |c| ops::attempts(c, sub)).await
    }

    async fn redeliver(&self, sub: TenantSub, now: Timestamp) -> Result<Option<Redelivery>> {
        self.exec(move |tx| ops::redeliver(tx, sub, now)).await
    }

    async fn retry_now(&self, sub: TenantSub, now: Timestamp) -> Result<Option<RetryNow>> {
        self.exec(move |tx| ops::retry_now(tx, sub, now)).await
    }

    async fn matching_ended(&self, tenant_id: i64, filter: &BulkFilter) -> Result<Vec<SubscriptionId>> {
        let filter = filter.clone();
        self.read(move |c| ops::matching_ended(c, tenant_id, &filter)).await
    }

    async fn redeliver_batch(&self, tenant_id: i64, ids: &[SubscriptionId], now: Timestamp) -> Result<Vec<Redelivery>> {
        // One transaction for the batch, on the writer thread (which needs its own copy of the IDs); a
        // subscription gone meanwhile (purged) is left out.
        let ids = ids.to_vec();
        self.exec(move |tx| {
            let found = ids.into_iter().map(|id| ops::redeliver(tx, TenantSub { tenant_id, id }, now));
            found.filter_map(Result::transpose).collect()
        })
        .await
    }

    async fn pollable_jobs(&self) -> Result<Vec<PollableJob>> {
        self.read(|c| ops::pollable(c, concat!(pollable_select!(sqlite), " GROUP BY j.job_id"), [])).await
    }

    async fn pollable_job(&self, job_id: JobId) -> Result<Option<PollableJob>> {
        let sql = concat!(pollable_select!(sqlite), " WHERE j.job_id = ?1 GROUP BY j.job_id");
        Ok(self.read(move |c| ops::pollable(c, sql, [job_id.to_string()])).await?.pop())
    }

    async fn record_observation(&self, observation: Observation) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.write(Write::Observe { observation, reply }, answer).await
    }

    async fn complete_job(&self, end: JobEnd, claim_for: Duration) -> Result<Vec<DeliveryTask>> {
        let (reply, answer) = oneshot::channel();
        self.write(Write::Complete { end, claim: ClaimFor::new(&self.instance, claim_for), reply }, answer).await
    }

    async fn fail_job(&self, job_id: JobId, reason: FailureReason, last_error: &str, now: Timestamp) -> Result<u64> {
        let last_error = last_error.to_owned();
        self.exec(move |tx| ops::fail_job(tx, job_id, reason, &last_error, now)).await
    }

    async fn expire(&self, job_id: JobId, cutoff: Timestamp, now: Timestamp) -> Result<(u64, Option<PollableJob>)> {
        self.exec(move |tx| ops::expire(tx, job_id, cutoff, now)).await
    }

    async fn count_by_state(&self) -> Result<Vec<(String, i64)>> {
        self.read(|c| {
            // Kept by triggers with every change (migration 0005): six rows, not a count of the table.
            let mut statement = c.prepare_cached("SELECT state, n FROM subscription_counts").sq()?;
            let rows = statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).sq()?;
            rows.collect::<rusqlite::Result<_>>().sq()
        })
        .await
    }

    async fn purge_ended(&self, ended_before: Timestamp, limit: u32) -> Result<Option<Purged>> {
        // One process serves a SQLite file, so nobody else purges it (`jobhook purge` run beside it takes
        // turns for the write lock).
        self.exec_bulk(move |tx| purge::purge_batch(tx, ended_before, limit)).await.map(Some)
    }

    async fn purgeable(&self, ended_before: Timestamp) -> Result<Purged> {
        self.read(move |c| purge::purgeable(c, ended_before)).await
    }

    async fn reclaim_space(&self) -> Result<()> {
        // A step at a time, so writes queued behind it wait for one step, not the whole vacuum.
        for _ in 0..100_000 {
            if !self.exec_bulk(purge::vacuum_step).await? {
                break;
            }
        }
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        self.read(|c| c.query_row("SELECT COUNT(*) FROM meta", [], |r| r.get::<_, i64>(0)).sq()).await?;
        // Writes failing lately (and none going through since) is not ready either. The mark lapses on
        // its own, so an idle instance whose disk recovered becomes ready without writing anything; if
        // the disk is still full, the next write marks it again.
        let failed_at = self.write_trouble.load(std::sync::atomic::Ordering::Relaxed);
        if failed_at > 0 && Timestamp::now().duration_since(Timestamp::from_millis(failed_at)) < WRITE_TROUBLE_FOR {
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

    async fn clock(&self) -> Result<Timestamp> {
        // One process, one clock.
        Ok(Timestamp::now())
    }

    async fn heartbeat(&self, instance: &str, now: Timestamp, live_after: Timestamp) -> Result<i64> {
        let instance = instance.to_owned();
        self.exec(move |tx| ops::heartbeat(tx, &instance, now, live_after)).await
    }

    async fn renew_leases(&self, instance: &str, until: Timestamp) -> Result<u64> {
        let instance = instance.to_owned();
        self.exec(move |tx| {
            let sql = "UPDATE leases SET expires_at = ?1 WHERE owner = ?2 RETURNING partition";
            ops::partitions(tx, sql, rusqlite::params![until, instance])
        })
        .await
    }

    async fn claim_leases(&self, instance: &str, n: i64, now: Timestamp, until: Timestamp) -> Result<u64> {
        let instance = instance.to_owned();
        self.exec(move |tx| {
            let sql = "UPDATE leases SET owner = ?1, expires_at = ?3 WHERE partition IN \
                 (SELECT partition FROM leases WHERE owner IS NULL OR expires_at < ?2 ORDER BY random() LIMIT ?4) \
                 RETURNING partition";
            ops::partitions(tx, sql, rusqlite::params![instance, now, until, n])
        })
        .await
    }

    async fn release_leases(&self, instance: &str, partitions: u64) -> Result<()> {
        let instance = instance.to_owned();
        self.exec(move |tx| ops::release_leases(tx, &instance, partitions)).await
    }

    async fn leave(&self, instance: &str) -> Result<()> {
        let (instance, me) = (instance.to_owned(), self.instance.clone());
        self.exec(move |tx| ops::leave(tx, &instance, &me)).await
    }

    async fn pollable_jobs_in(&self, partitions: u64) -> Result<Vec<PollableJob>> {
        let sql = concat!(
            pollable_select!(sqlite),
            " WHERE ((?1 >> CAST(j.partition AS INTEGER)) & 1) = 1 GROUP BY j.job_id"
        );
        self.read(move |c| ops::pollable(c, sql, [partitions as i64])).await
    }

    async fn pending_deliveries_in(&self, partitions: u64) -> Result<Vec<DeliveryTask>> {
        let sql = concat!(
            delivery_select!(),
            " WHERE s.state = 'delivering' AND ((?1 >> CAST(s.partition AS INTEGER)) & 1) = 1"
        );
        self.read(move |c| ops::deliveries(c, sql, [partitions as i64])).await
    }

    async fn delivery_task(&self, id: SubscriptionId) -> Result<Option<DeliveryTask>> {
        let sql = concat!(delivery_select!(), " WHERE s.state = 'delivering' AND s.id = ?1");
        Ok(self.read(move |c| ops::deliveries(c, sql, [id.to_string()])).await?.pop())
    }

    async fn pending_deliveries(&self) -> Result<Vec<DeliveryTask>> {
        let sql = concat!(delivery_select!(), " WHERE s.state = 'delivering'");
        self.read(move |c| ops::deliveries(c, sql, [])).await
    }

    async fn claim_delivery(&self, task: &DeliveryTask, claim_for: Duration) -> Result<Claim> {
        let (reply, answer) = oneshot::channel();
        let claim = ClaimFor::new(&self.instance, claim_for);
        let (id, partition, series) = (task.subscription_id, task.partition, task.series);
        self.write(Write::Claim { id, partition, series, now: Timestamp::now(), claim, reply }, answer).await
    }

    async fn record_attempt(&self, record: &AttemptRecord, result: AttemptResult, now: Timestamp) -> Result<bool> {
        let (reply, answer) = oneshot::channel();
        self.write(Write::Attempt { record: record.clone(), result, now, reply }, answer).await
    }
}
