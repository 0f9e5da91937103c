//! The store over SQL, one implementation for both backends: SQLite (embedded, the default) and
//! PostgreSQL (several instances sharing one database). sqlx's `Any` driver carries the queries; the SQL
//! is written once, and the few statements that must differ stand side by side (`Backend::pick`).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;
use sqlx::{Any, Executor, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::domain::new_webhook_id;
use sha2::{Digest, Sha256};

mod sqlite_writer;

/// Which database is behind the pools. The SQL is written once, in SQLite's placeholder style (`?`,
/// `?N`); [`Backend::sql`] rewrites it for PostgreSQL (`$N`). Statements that must differ are chosen
/// with [`Backend::pick`], the two spellings side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// `sql` as this backend writes it.
    pub fn sql(self, sql: &'static str) -> &'static str {
        match self {
            Backend::Sqlite => sql,
            Backend::Postgres => rewrite_cached(sql),
        }
    }

    /// A statement built at run time (from constant pieces), as this backend writes it.
    pub fn sql_fmt(self, sql: String) -> &'static str {
        match self {
            Backend::Sqlite => leak_cached(sql),
            Backend::Postgres => rewrite_cached(&sql),
        }
    }

    /// One of two spellings of a statement that cannot be written the same way for both.
    pub fn pick(self, sqlite: &'static str, postgres: &'static str) -> &'static str {
        match self {
            Backend::Sqlite => sqlite,
            Backend::Postgres => postgres,
        }
    }
}

/// Statements are a fixed set, so each rewritten (or run-time built) one is made once and kept.
static CACHE: LazyLock<Mutex<HashMap<String, &'static str>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

fn leak_cached(sql: String) -> &'static str {
    let mut cache = CACHE.lock().expect("the statement cache is never poisoned");
    if let Some(kept) = cache.get(&format!("raw:{sql}")) {
        return kept;
    }
    let kept: &'static str = Box::leak(sql.clone().into_boxed_str());
    cache.insert(format!("raw:{sql}"), kept);
    kept
}

fn rewrite_cached(sql: &str) -> &'static str {
    let mut cache = CACHE.lock().expect("the statement cache is never poisoned");
    if let Some(kept) = cache.get(sql) {
        return kept;
    }
    let kept: &'static str = Box::leak(to_dollar_placeholders(sql).into_boxed_str());
    cache.insert(sql.to_owned(), kept);
    kept
}

/// SQLite's `?` and `?N` placeholders as PostgreSQL's `$N`, with SQLite's numbering: a bare `?` takes
/// the largest number used so far plus one. Text inside single quotes is left alone.
pub fn to_dollar_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.chars().peekable();
    let (mut highest, mut quoted) = (0u32, false);
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                quoted = !quoted;
                out.push(c);
            }
            '?' if !quoted => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    digits.push(*d);
                    chars.next();
                }
                let n = if digits.is_empty() { highest + 1 } else { digits.parse().unwrap_or(highest + 1) };
                highest = highest.max(n);
                out.push('$');
                out.push_str(&n.to_string());
            }
            _ => out.push(c),
        }
    }
    out
}

/// The store over SQL: an embedded SQLite file (the default) or a PostgreSQL server.
pub struct SqlStore {
    backend: Backend,
    writer: AnyPool,
    reader: AnyPool,
    /// The group-committed writes go to the writer tasks (see [`writer`]); all writes about one job go
    /// to the same one.
    writes: Vec<mpsc::Sender<Write>>,
    /// Write transactions started (group-committed batches included), and the writers' busy time.
    stats: Arc<WriterStats>,
    /// When (Unix ms) the last group-committed write failed with "unavailable" (disk full, read-only…),
    /// if none has succeeded since; 0 otherwise. `ping` reports it for [`WRITE_TROUBLE_FOR`].
    write_trouble: Arc<std::sync::atomic::AtomicI64>,
    /// Who this process is when it claims deliveries: on PostgreSQL a new name per process; on SQLite,
    /// where one process serves a file at a time (see `lock_sqlite_for_serving`), always the same, so a
    /// restart takes its predecessor's claims over at once.
    instance: Arc<str>,
}

/// A claim is taken this much before the stored expiry on this process's clock, so the two clocks'
/// tiny drift over a claim's life never lets us believe we hold one that has lapsed.
const CLAIM_SAFETY: Duration = Duration::from_secs(1);

/// The database's clock in Unix milliseconds (PostgreSQL), the one clock every instance's claims are
/// read from (as for leases).
macro_rules! pg_now_ms {
    () => {
        "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
    };
}

/// A write that is group-committed: many of them share one transaction, so they share one fsync.
enum Write {
    Register {
        key: KeyHash,
        id: SubscriptionId,
        job_id: JobId,
        callback_url: CallbackUrl,
        now: Millis,
        reply: oneshot::Sender<Result<Registered>>,
    },
    Complete {
        job_id: JobId,
        status: JobStatus,
        body: Bytes,
        now: Millis,
        claim: ClaimFor,
        reply: oneshot::Sender<Result<Vec<DeliveryTask>>>,
    },
    Claim {
        id: SubscriptionId,
        partition: i64,
        series: u32,
        now: Millis,
        claim: ClaimFor,
        reply: oneshot::Sender<Result<Claim>>,
    },
    Attempt {
        record: AttemptRecord,
        result: AttemptResult,
        now: Millis,
        reply: oneshot::Sender<Result<bool>>,
    },
    Observe {
        job_id: JobId,
        status: Option<JobStatus>,
        last_error: Option<String>,
        now: Millis,
        reply: oneshot::Sender<Result<()>>,
    },
}

/// Who claims a delivery, and for how long (milliseconds).
#[derive(Debug, Clone)]
struct ClaimFor {
    by: Arc<str>,
    ms: i64,
    /// The claim's end on this process's clock, a little before the stored one.
    held_until: std::time::Instant,
}

/// How long a write batch may wait for PostgreSQL before it is abandoned (see [`writer`]).
const BATCH_DEADLINE: Duration = Duration::from_secs(15);

/// What every PostgreSQL connection is told at connect: no statement runs longer than
/// `statement_timeout`, none waits for a lock longer than `lock_timeout` (our transactions are short;
/// a longer wait is a stuck peer), a transaction left idle is ended, and the server probes an idle client
/// with TCP keepalives, so a client that vanished releases its locks within about a minute.
const PG_SESSION: &str = "SET statement_timeout = '30s'; SET lock_timeout = '10s'; \
     SET idle_in_transaction_session_timeout = '60s'; SET tcp_keepalives_idle = 30; \
     SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3";

/// The most writes one transaction carries.
const MAX_BATCH: usize = 1024;

/// Group commit: takes every write waiting, runs them in one transaction — each inside a savepoint, so
/// one that fails rolls back alone — commits once, and only then answers each (a 201 is still durable).
/// Batches form by themselves: while one transaction commits, the next writes queue up. On SQLite this
/// turns ~6k one-row commits/s into tens of thousands of rows/s (DESIGN, "This machine's limits").
async fn writer(backend: Backend, pool: AnyPool, mut writes: mpsc::Receiver<Write>, stats: Arc<WriterStats>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        if writes.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        // Every batch takes its row locks in the same order (by job), so batches of different
        // instances cannot deadlock on PostgreSQL.
        batch.sort_by_key(Write::lock_order);
        stats.transactions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = std::time::Instant::now();
        // A deadline of our own: a connection whose server stopped answering without closing it (a
        // half-open TCP connection, a frozen backend) would otherwise pin this lane until a restart.
        // sqlx has no client-side TCP keepalive, and the server's statement_timeout cannot fire on a
        // server that is not running. Dropping the batch rolls it back: nothing was committed.
        let outcome = match tokio::time::timeout(BATCH_DEADLINE, run_batch(backend, &pool, &batch)).await {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::error!(deadline = ?BATCH_DEADLINE, "a write batch got no answer from the database in time; its connection is dropped");
                batch.iter().map(|w| w.failed(StoreError::Unavailable(sqlx::Error::PoolTimedOut))).collect()
            }
        };
        stats.batch(started);
        for (write, result) in batch.drain(..).zip(outcome) {
            write.answer(result);
        }
    }
}

/// What one write produced, until its transaction has committed. (Short-lived, at most a batch of them:
/// the size difference between variants does not matter.)
#[allow(clippy::large_enum_variant)]
enum Done {
    Register(Result<Registered>),
    Complete(Result<Vec<DeliveryTask>>),
    Claim(Result<Claim>),
    Attempt(Result<bool>),
    Observe(Result<()>),
}

impl Write {
    fn lock_order(&self) -> (u8, uuid::Uuid) {
        match self {
            Write::Register { job_id, .. } | Write::Complete { job_id, .. } | Write::Observe { job_id, .. } => {
                (0, job_id.as_uuid())
            }
            Write::Attempt { record, .. } => (1, record.subscription_id.0),
            Write::Claim { id, .. } => (1, id.0),
        }
    }

    /// The partition of the job the write is about.
    fn partition(&self) -> i64 {
        match self {
            Write::Register { job_id, .. } | Write::Complete { job_id, .. } | Write::Observe { job_id, .. } => {
                job_id.partition()
            }
            Write::Attempt { record, .. } => record.partition,
            Write::Claim { partition, .. } => *partition,
        }
    }

    async fn run(&self, b: Backend, tx: &mut Transaction<'static, Any>) -> Done {
        match self {
            Write::Register { key, id, job_id, callback_url, now, .. } => {
                Done::Register(register_in(b, tx, key, *id, *job_id, callback_url, *now).await)
            }
            Write::Complete { job_id, status, body, now, claim, .. } => {
                Done::Complete(complete_job_in(b, tx, *job_id, *status, body, *now, claim).await)
            }
            Write::Claim { id, series, now, claim, .. } => {
                Done::Claim(claim_in(b, tx, *id, *series, *now, claim).await)
            }
            Write::Attempt { record, result, now, .. } => {
                Done::Attempt(record_attempt_in(b, tx, record, *result, *now).await)
            }
            Write::Observe { job_id, status, last_error, now, .. } => {
                Done::Observe(record_observation_in(b, tx, *job_id, *status, last_error.as_deref(), *now).await)
            }
        }
    }

    /// Sends the result to the caller (who may have gone: then nobody waits for it).
    fn answer(self, done: Done) {
        match (self, done) {
            (Write::Register { reply, .. }, Done::Register(r)) => drop(reply.send(r)),
            (Write::Complete { reply, .. }, Done::Complete(r)) => drop(reply.send(r)),
            (Write::Claim { reply, .. }, Done::Claim(r)) => drop(reply.send(r)),
            (Write::Attempt { reply, .. }, Done::Attempt(r)) => drop(reply.send(r)),
            (Write::Observe { reply, .. }, Done::Observe(r)) => drop(reply.send(r)),
            (write, _) => write.answer_with(StoreError::Corrupt("a write got another write's result".into())),
        }
    }

    fn answer_with(self, e: StoreError) {
        match self {
            Write::Register { reply, .. } => drop(reply.send(Err(e))),
            Write::Complete { reply, .. } => drop(reply.send(Err(e))),
            Write::Claim { reply, .. } => drop(reply.send(Err(e))),
            Write::Attempt { reply, .. } => drop(reply.send(Err(e))),
            Write::Observe { reply, .. } => drop(reply.send(Err(e))),
        }
    }
}

/// Runs `batch` in one transaction. Writes rarely fail, so the batch is tried whole; if any write fails,
/// the transaction is rolled back and each write runs again in a transaction of its own, so one bad
/// write cannot fail the others. Every write gets a result; when a commit fails, "unavailable" (nothing
/// was written).
async fn run_batch(b: Backend, pool: &AnyPool, batch: &[Write]) -> Vec<Done> {
    if batch.len() > 1 {
        match try_batch(b, pool, batch).await {
            Ok(results) => return results,
            // The database is away: every write would fail alike, so answer them all now.
            Err(StoreError::Unavailable(e)) => {
                return batch
                    .iter()
                    .map(|w| w.failed(StoreError::Unavailable(sqlx::Error::Protocol(e.to_string()))))
                    .collect();
            }
            Err(_) => {} // one write's own failure: each alone, below
        }
    }
    let mut results = Vec::with_capacity(batch.len());
    for write in batch {
        results.push(match try_batch(b, pool, std::slice::from_ref(write)).await {
            Ok(mut one) => one.pop().unwrap_or_else(|| write.failed(StoreError::Corrupt("no result".into()))),
            Err(e) => write.failed(e),
        });
    }
    results
}

/// All of `batch` in one transaction, committed; or the first error, with nothing written.
async fn try_batch(b: Backend, pool: &AnyPool, batch: &[Write]) -> Result<Vec<Done>> {
    let mut tx = pool.begin().await.db()?;
    let mut results = Vec::with_capacity(batch.len());
    for write in batch {
        // On an error, dropping the transaction rolls it back.
        results.push(write.run(b, &mut tx).await.checked()?);
    }
    tx.commit().await.db()?;
    Ok(results)
}

impl Done {
    /// The write's own error, if it failed; otherwise the result itself.
    fn checked(self) -> std::result::Result<Done, StoreError> {
        match self {
            Done::Register(Err(e))
            | Done::Complete(Err(e))
            | Done::Claim(Err(e))
            | Done::Attempt(Err(e))
            | Done::Observe(Err(e)) => Err(e),
            done => Ok(done),
        }
    }
}

impl Write {
    /// This write's result kind, carrying an error.
    fn failed(&self, e: StoreError) -> Done {
        match self {
            Write::Register { .. } => Done::Register(Err(e)),
            Write::Complete { .. } => Done::Complete(Err(e)),
            Write::Claim { .. } => Done::Claim(Err(e)),
            Write::Attempt { .. } => Done::Attempt(Err(e)),
            Write::Observe { .. } => Done::Observe(Err(e)),
        }
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

impl SqlStore {
    pub async fn open(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        if url.starts_with("postgres") {
            // One direct connection first: a pool that cannot connect says only "pool timed out" after
            // its timeout, where this says why at once (refused, wrong password, no such database).
            let mut probe = tokio::time::timeout(BUSY_TIMEOUT, <sqlx::AnyConnection as sqlx::Connection>::connect(url))
                .await
                .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolTimedOut))?
                .map_err(|e| match &e {
                    // SQLSTATE 3D000 invalid_catalog_name: said plainly rather than as the server's
                    // message with its source file and line.
                    sqlx::Error::Database(db) if db.code().as_deref() == Some("3D000") => {
                        StoreError::NoDatabase(postgres_database_name(url))
                    }
                    _ => classify(e),
                })?;
            // Migrations run on this connection, without the pool's statement timeout: an index built
            // by a future migration may take longer.
            migrator(sqlx::migrate!("src/store/migrations/postgres")).run(&mut probe).await?;
            let _ = sqlx::Connection::close(probe).await;
            let pool = AnyPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(BUSY_TIMEOUT)
                .after_connect(|conn, _| Box::pin(async move { conn.execute(PG_SESSION).await.map(drop) }))
                .connect(url)
                .await
                .map_err(classify)?;
            return Ok(SqlStore::with_writer(Backend::Postgres, pool.clone(), pool));
        }
        // SQLite: WAL with synchronous=FULL, so a commit is fsynced before we answer and survives a
        // power cut as well as kill -9. Writes go through exactly one connection: SQLite has one writer
        // at a time anyway, and queueing writers in our async pool beats spinning in its busy handler.
        // Reads use a separate read-only pool, which WAL lets run beside the writer.
        let Some(path) = sqlite_file(url).map(str::to_owned) else {
            return Err(StoreError::Other(sqlx::Error::Configuration(
                "in-memory SQLite stores are not supported: name a file".into(),
            )));
        };
        let separator = if url.contains('?') { '&' } else { '?' };
        let writer = AnyPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(BUSY_TIMEOUT)
            .after_connect(sqlite_pragmas)
            .connect(&format!("{url}{separator}mode=rwc"))
            .await
            .map_err(classify)?;
        migrator(sqlx::migrate!("src/store/migrations/sqlite")).run(&writer).await?;
        let reader = AnyPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(BUSY_TIMEOUT)
            .after_connect(sqlite_pragmas)
            .connect(&format!("{url}{separator}mode=ro"))
            .await
            .map_err(classify)?;
        let store = SqlStore::with_writer(Backend::Sqlite, writer, reader);
        let (writes, queue) = mpsc::channel(8 * MAX_BATCH);
        sqlite_writer::spawn(path, queue, store.stats.clone())
            .map_err(|e| StoreError::Unavailable(sqlx::Error::Io(e)))?;
        Ok(SqlStore { writes: vec![writes], ..store })
    }

    fn with_writer(backend: Backend, writer_pool: AnyPool, reader: AnyPool) -> Self {
        // Bounded: when the database cannot keep up, callers wait here instead of piling up memory.
        // SQLite has one writer anyway. PostgreSQL commits several transactions at once, and each
        // statement waits a network round trip: several writers keep its connections busy. Each job's
        // writes go to one writer (by partition), so concurrent batches never lock the same rows in
        // opposite orders (no deadlocks).
        // (On SQLite these are replaced by one rusqlite writer thread: see sqlite_writer.rs.)
        let writers = match backend {
            Backend::Sqlite => 0,
            Backend::Postgres => 8,
        };
        let stats = Arc::new(WriterStats::default());
        let writes = (0..writers)
            .map(|_| {
                let (writes, queue) = mpsc::channel(8 * MAX_BATCH);
                tokio::spawn(writer(backend, writer_pool.clone(), queue, stats.clone()));
                writes
            })
            .collect();
        let instance: Arc<str> = match backend {
            Backend::Sqlite => "local".into(),
            Backend::Postgres => uuid::Uuid::new_v4().to_string().into(),
        };
        SqlStore { backend, writer: writer_pool, reader, writes, stats, write_trouble: Default::default(), instance }
    }

    /// Queues a group-committed write and waits for its result (after its transaction committed).
    async fn write<T>(&self, write: Write, answer: oneshot::Receiver<Result<T>>) -> Result<T> {
        let gone = || StoreError::Unavailable(sqlx::Error::PoolClosed);
        let lane = usize::try_from(write.partition()).unwrap_or(0) % self.writes.len();
        let queued = std::time::Instant::now();
        self.writes[lane].send(write).await.map_err(|_| gone())?;
        let done = answer.await.map_err(|_| gone())?;
        self.stats.write_seconds.observe(queued.elapsed().as_secs_f64());
        let trouble = if matches!(done, Err(StoreError::Unavailable(_))) { now_ms() } else { 0 };
        self.write_trouble.store(trouble, std::sync::atomic::Ordering::Relaxed);
        done
    }

    /// A claim by this process for `d`, starting now.
    fn claim_for(&self, d: Duration) -> ClaimFor {
        ClaimFor {
            by: self.instance.clone(),
            ms: i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            held_until: std::time::Instant::now() + d.saturating_sub(CLAIM_SAFETY),
        }
    }

    async fn begin(&self) -> Result<Transaction<'static, Any>> {
        self.stats.transactions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // On SQLite, take the write lock at BEGIN: a transaction that reads first and writes second would
        // otherwise fail at once (SQLITE_BUSY) whenever the group-commit writer committed in between,
        // while one that waits for the lock up front simply waits its turn.
        self.writer.begin_with(self.backend.pick("BEGIN IMMEDIATE", "BEGIN")).await.map_err(classify)
    }
}

/// The settings every SQLite connection gets (see [`SqlStore::open`]).
fn sqlite_pragmas(
    conn: &mut sqlx::AnyConnection,
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

/// Sorts a database error into "try again later" (the disk, the file, the connection, a lock) and the
/// rest.
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

fn classify(e: sqlx::Error) -> StoreError {
    let unavailable = match &e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            if db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_some() {
                // SQLSTATE classes: 08 connection, 53 insufficient resources (disk full), 57 operator
                // intervention (shutdown, terminated backend), 58 system error; 25006 read-only
                // transaction; 40001/40P01 serialization failure and deadlock.
                ["08", "53", "57", "58"].iter().any(|class| code.starts_with(class))
                    || matches!(code.as_ref(), "25006" | "40001" | "40P01")
            } else {
                // SQLite primary result codes: BUSY 5, LOCKED 6, NOMEM 7, READONLY 8, IOERR 10, FULL 13,
                // CANTOPEN 14, PROTOCOL 15.
                matches!(code.parse::<i64>().map(|c| c & 0xff), Ok(5 | 6 | 7 | 8 | 10 | 13 | 14 | 15))
            }
        }
        _ => false,
    };
    if unavailable { StoreError::Unavailable(e) } else { StoreError::Other(e) }
}

trait Classify<T> {
    fn db(self) -> Result<T>;
}

impl<T> Classify<T> for std::result::Result<T, sqlx::Error> {
    fn db(self) -> Result<T> {
        self.map_err(classify)
    }
}

fn corrupt(what: &str, value: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {value}"))
}

const SUBSCRIPTION_COLUMNS: &str = "s.id, s.job_id, s.callback_url, s.state, s.failure_reason, s.webhook_id, s.attempts, \
     s.next_attempt_at, s.created_at, s.updated_at, j.status AS job_status, j.last_error";

#[derive(sqlx::FromRow)]
struct SubscriptionRow {
    id: String,
    job_id: String,
    callback_url: String,
    state: String,
    failure_reason: Option<String>,
    webhook_id: Option<String>,
    attempts: i64,
    next_attempt_at: Option<i64>,
    created_at: i64,
    updated_at: i64,
    job_status: Option<String>,
    last_error: Option<String>,
}

impl TryFrom<SubscriptionRow> for Subscription {
    type Error = StoreError;

    fn try_from(r: SubscriptionRow) -> Result<Self> {
        Ok(Subscription {
            id: r.id.parse().map_err(|e| corrupt("subscription id", e))?,
            job_id: r.job_id.parse().map_err(|e| corrupt("job id", e))?,
            callback_url: r.callback_url,
            state: r.state.parse().map_err(|e| corrupt("state", e))?,
            job_status: r.job_status.map(|s| s.parse()).transpose().map_err(|e| corrupt("job status", e))?,
            failure_reason: r
                .failure_reason
                .map(|s| s.parse())
                .transpose()
                .map_err(|e| corrupt("failure reason", e))?,
            last_error: r.last_error,
            webhook_id: r.webhook_id,
            attempts: u32::try_from(r.attempts).unwrap_or(0),
            next_attempt_at: r.next_attempt_at,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct PollableRow {
    job_id: String,
    job_created_at: i64,
    oldest_polling_at: i64,
}

impl TryFrom<PollableRow> for PollableJob {
    type Error = StoreError;

    fn try_from(r: PollableRow) -> Result<Self> {
        Ok(PollableJob {
            job_id: r.job_id.parse().map_err(|e| corrupt("job id", e))?,
            job_created_at: r.job_created_at,
            oldest_polling_at: r.oldest_polling_at,
        })
    }
}

const POLLABLE_SELECT: &str = "SELECT j.job_id AS job_id, j.created_at AS job_created_at, MIN(s.created_at) AS oldest_polling_at \
     FROM jobs j JOIN subscriptions s ON s.job_id = j.job_id AND s.state = 'polling'";

#[derive(sqlx::FromRow)]
struct DeliveryRow {
    id: String,
    job_id: String,
    tenant_id: i64,
    partition: i64,
    webhook_id: Option<String>,
    callback_url: String,
    result: Option<Vec<u8>>,
    series: i64,
    attempts: i64,
    next_attempt_at: Option<i64>,
}

impl TryFrom<DeliveryRow> for DeliveryTask {
    type Error = StoreError;

    fn try_from(r: DeliveryRow) -> Result<Self> {
        Ok(DeliveryTask {
            subscription_id: r.id.parse().map_err(|e| corrupt("subscription id", e))?,
            job_id: r.job_id.parse().map_err(|e| corrupt("job id", e))?,
            tenant_id: r.tenant_id,
            partition: r.partition,
            webhook_id: r.webhook_id.ok_or_else(|| corrupt("delivery without webhook id", &r.id))?,
            callback_url: r.callback_url,
            body: Bytes::from(r.result.ok_or_else(|| corrupt("delivery without a job result", &r.id))?),
            series: u32::try_from(r.series).unwrap_or(1),
            attempts_made: u32::try_from(r.attempts).unwrap_or(0),
            due_at: r.next_attempt_at.unwrap_or(0),
            claimed_until: None,
        })
    }
}

const DELIVERY_SELECT: &str = "SELECT s.id, s.job_id, s.tenant_id, s.partition, s.webhook_id, s.callback_url, j.result, s.series, s.attempts, s.next_attempt_at \
     FROM subscriptions s JOIN jobs j ON j.job_id = s.job_id";

/// Tells the other instances about work they may own (PostgreSQL: delivered when `tx` commits, or never).
async fn notify(b: Backend, tx: &mut Transaction<'static, Any>, notice: String) -> Result<()> {
    if b == Backend::Postgres {
        sqlx::query("SELECT pg_notify('jobhook', $1)").bind(notice).execute(&mut **tx).await.db()?;
    }
    Ok(())
}

/// Partition numbers as a mask (bit p = partition p).
fn mask_of(partitions: &[i64]) -> u64 {
    partitions.iter().filter(|p| (0..64).contains(*p)).fold(0, |mask, p| mask | 1 << p)
}

fn parse_secret(stored: &str) -> Result<SigningSecret> {
    stored.parse::<SigningSecret>().map_err(|e| corrupt("signing secret", e))
}

async fn subscription_in(b: Backend, tx: &mut Transaction<'static, Any>, id: &str) -> Result<Subscription> {
    let sql =
        format!("SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions s JOIN jobs j ON j.job_id = s.job_id WHERE s.id = ?");
    let row: SubscriptionRow = sqlx::query_as(b.sql_fmt(sql)).bind(id).fetch_one(&mut **tx).await.db()?;
    row.try_into()
}

async fn pollable_in(b: Backend, tx: &mut Transaction<'static, Any>, job_id: &str) -> Result<Option<PollableJob>> {
    let sql = format!("{POLLABLE_SELECT} WHERE j.job_id = ? GROUP BY j.job_id");
    let row: Option<PollableRow> = sqlx::query_as(b.sql_fmt(sql)).bind(job_id).fetch_optional(&mut **tx).await.db()?;
    row.map(PollableJob::try_from).transpose()
}

#[async_trait]
impl Store for SqlStore {
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
            sqlx::query_as(self.backend.sql("SELECT id, key_hash, revoked_by FROM api_keys WHERE source = 'config'"))
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
            let query = sqlx::query(self.backend.sql(sql));
            let query = if still { query } else { query.bind(now) };
            query.bind(id).execute(&mut *tx).await.db()?;
        }
        // The configured secret is applied when it changes, not at every start: a rotation through the
        // API since then is kept.
        let fingerprint = secret.map(|s| Sha256::digest(s.bytes()).to_vec());
        let applied: Option<Vec<u8>> =
            sqlx::query_scalar(self.backend.sql("SELECT value FROM meta WHERE key = 'configured_signing_secret'"))
                .fetch_optional(&mut *tx)
                .await
                .db()?;
        let secret_changed = fingerprint.is_some() && fingerprint != applied;
        if let Some(fingerprint) = fingerprint.as_ref().filter(|_| secret_changed) {
            sqlx::query(self.backend.sql(
                "INSERT INTO meta (key, value) VALUES ('configured_signing_secret', ?) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            ))
            .bind(fingerprint.as_slice())
            .execute(&mut *tx)
            .await
            .db()?;
        }
        for (i, key) in keys.iter().enumerate() {
            let tenant: Option<i64> =
                sqlx::query_scalar(self.backend.sql("SELECT tenant_id FROM api_keys WHERE key_hash = ?"))
                    .bind(key.0.as_slice())
                    .fetch_optional(&mut *tx)
                    .await
                    .db()?;
            match tenant {
                Some(tenant_id) => {
                    if let Some(secret) = secret.filter(|_| secret_changed) {
                        sqlx::query(self.backend.sql("UPDATE tenants SET signing_secret = ? WHERE id = ?"))
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
                    insert_tenant_with_key(self.backend, &mut tx, &name, *key, &secret, "config", now).await?;
                    sync.created += 1;
                }
            }
        }
        tx.commit().await.db()?;
        Ok(sync)
    }

    async fn create_key(&self, name: &str, key: KeyHash, secret: &SigningSecret, now: Millis) -> Result<i64> {
        let mut tx = self.begin().await?;
        let id = insert_tenant_with_key(self.backend, &mut tx, name, key, secret, "stored", now).await?;
        tx.commit().await.db()?;
        Ok(id)
    }

    async fn add_key(&self, tenant_id: i64, name: &str, key: KeyHash, now: Millis) -> Result<Option<i64>> {
        let mut tx = self.begin().await?;
        let tenant: Option<i64> = sqlx::query_scalar(self.backend.sql("SELECT id FROM tenants WHERE id = ?"))
            .bind(tenant_id)
            .fetch_optional(&mut *tx)
            .await
            .db()?;
        if tenant.is_none() {
            return Ok(None);
        }
        let id: i64 = sqlx::query_scalar(self.backend.sql(
            "INSERT INTO api_keys (tenant_id, name, key_hash, source, created_at) VALUES (?, ?, ?, 'stored', ?) \
             RETURNING id",
        ))
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
        sqlx::query_scalar(self.backend.sql("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL"))
            .fetch_one(&self.reader)
            .await
            .db()
    }

    async fn tenant_by_key(&self, key: KeyHash) -> Result<Option<Tenant>> {
        let row: Option<(i64, String)> = sqlx::query_as(self.backend.sql(
            "SELECT t.id, t.signing_secret FROM api_keys k JOIN tenants t ON t.id = k.tenant_id \
             WHERE k.key_hash = ? AND k.revoked_at IS NULL",
        ))
        .bind(key.0.as_slice())
        .fetch_optional(&self.reader)
        .await
        .db()?;
        row.map(|(id, secret)| Ok(Tenant { id, secret: Arc::new(parse_secret(&secret)?) })).transpose()
    }

    async fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        let rows: Vec<(i64, i64, String, String, i64, Option<i64>)> = sqlx::query_as(
            self.backend.sql("SELECT id, tenant_id, name, source, created_at, revoked_at FROM api_keys ORDER BY id"),
        )
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
            self.backend
                .sql("UPDATE api_keys SET revoked_at = ?, revoked_by = 'command' WHERE id = ? AND revoked_at IS NULL"),
        )
        .bind(now)
        .bind(id)
        .execute(&self.writer)
        .await
        .db()?;
        Ok(done.rows_affected() == 1)
    }

    async fn signing_secrets(&self, tenant_id: i64, now: Millis) -> Result<Vec<SigningSecret>> {
        let row: Option<(String, Option<String>, Option<i64>)> = sqlx::query_as(
            self.backend.sql("SELECT signing_secret, previous_secret, previous_until FROM tenants WHERE id = ?"),
        )
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
        sqlx::query(self.backend.sql(
            "UPDATE tenants SET previous_secret = signing_secret, previous_until = ?, signing_secret = ? WHERE id = ?",
        ))
        .bind(previous_until)
        .bind(new.expose())
        .bind(tenant_id)
        .execute(&self.writer)
        .await
        .db()?;
        Ok(())
    }

    async fn meta_secret(&self, name: &str) -> Result<Vec<u8>> {
        sqlx::query(self.backend.sql("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING"))
            .bind(name)
            .bind(rand::random::<[u8; 32]>().as_slice())
            .execute(&self.writer)
            .await
            .db()?;
        sqlx::query_scalar(self.backend.sql("SELECT value FROM meta WHERE key = ?"))
            .bind(name)
            .fetch_one(&self.writer)
            .await
            .db()
    }

    async fn redeliver(&self, tenant_id: i64, id: SubscriptionId, now: Millis) -> Result<Option<Redelivery>> {
        let sub_id = id.to_string();
        let mut tx = self.begin().await?;
        let sql = format!("{DELIVERY_SELECT} WHERE s.id = ? AND s.tenant_id = ?");
        let row: Option<DeliveryRow> = sqlx::query_as(self.backend.sql_fmt(sql))
            .bind(&sub_id)
            .bind(tenant_id)
            .fetch_optional(&mut *tx)
            .await
            .db()?;
        let Some(row) = row else { return Ok(None) };
        let state: String = sqlx::query_scalar(self.backend.sql("SELECT state FROM subscriptions WHERE id = ?"))
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
            self.backend.sql("SELECT CAST(1 AS BIGINT) FROM subscriptions s JOIN subscriptions o ON o.tenant_id = s.tenant_id AND o.job_id = s.job_id \
             AND o.callback_url = s.callback_url AND o.id <> s.id AND o.state IN ('polling', 'delivering', 'delivered') \
             WHERE s.id = ?"),
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
        let series: Option<i64> = sqlx::query_scalar(self.backend.sql(
            "UPDATE subscriptions SET state = 'delivering', series = series + 1, attempts = 0, failure_reason = NULL, \
             next_attempt_at = ?1, updated_at = ?1 WHERE id = ?2 AND state IN ('delivered', 'failed') RETURNING series",
        ))
        .bind(now)
        .bind(&sub_id)
        .fetch_optional(&mut *tx)
        .await
        .db()?;
        let Some(series) = series else {
            return Ok(Some(Redelivery::NotEnded(state)));
        };
        notify(self.backend, &mut tx, format!("deliver {sub_id} {}", row.partition)).await?;
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
        let sql = format!(
            "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions s JOIN jobs j ON j.job_id = s.job_id WHERE s.id = ? AND s.tenant_id = ?"
        );
        let row: Option<SubscriptionRow> = sqlx::query_as(self.backend.sql_fmt(sql))
            .bind(id.to_string())
            .bind(tenant_id)
            .fetch_optional(&self.reader)
            .await
            .db()?;
        row.map(Subscription::try_from).transpose()
    }

    async fn list_subscriptions(&self, tenant_id: i64, filter: &ListFilter) -> Result<Vec<Subscription>> {
        let sql = format!(
            "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions s JOIN jobs j ON j.job_id = s.job_id \
             WHERE s.tenant_id = ?1 AND (?2 IS NULL OR s.job_id = ?2) AND (?3 IS NULL OR s.state = ?3) AND (?4 IS NULL OR s.id < ?4) \
             ORDER BY s.id DESC LIMIT ?5"
        );
        let rows: Vec<SubscriptionRow> = sqlx::query_as(self.backend.sql_fmt(sql))
            .bind(tenant_id)
            .bind(filter.job_id.map(|j| j.to_string()))
            .bind(filter.state.map(|s| s.as_str()))
            .bind(filter.before.map(|b| b.to_string()))
            .bind(i64::from(filter.limit))
            .fetch_all(&self.reader)
            .await
            .db()?;
        rows.into_iter().map(Subscription::try_from).collect()
    }

    async fn cancel(&self, tenant_id: i64, id: SubscriptionId, now: Millis) -> Result<Option<Cancel>> {
        let sub_id = id.to_string();
        let mut tx = self.begin().await?;
        let row: Option<(String, String)> =
            sqlx::query_as(self.backend.sql("SELECT job_id, state FROM subscriptions WHERE id = ? AND tenant_id = ?"))
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
        let changed = sqlx::query(self.backend.pick(
            "UPDATE subscriptions SET state = 'cancelled', next_attempt_at = NULL, claimed_until = NULL, claimed_by = NULL, \
             updated_at = ?1 WHERE id = ?2 AND state IN ('polling', 'delivering') \
             AND (claimed_until IS NULL OR claimed_until <= ?1)",
            concat!(
                "UPDATE subscriptions SET state = 'cancelled', next_attempt_at = NULL, claimed_until = NULL, claimed_by = NULL, \
                 updated_at = $1 WHERE id = $2 AND state IN ('polling', 'delivering') \
                 AND (claimed_until IS NULL OR claimed_until <= ",
                pg_now_ms!(),
                ")"
            ),
        ))
        .bind(now)
        .bind(&sub_id)
        .execute(&mut *tx)
        .await
        .db()?;
        if changed.rows_affected() == 0 {
            // Claimed, or (PostgreSQL: the read above takes no lock) ended since. A live subscription here
            // is held by an attempt (or its claim lapsed a moment ago): the caller asks again shortly.
            let state: String = sqlx::query_scalar(self.backend.sql("SELECT state FROM subscriptions WHERE id = ?"))
                .bind(&sub_id)
                .fetch_one(&mut *tx)
                .await
                .db()?;
            let state: SubscriptionState = state.parse().map_err(|e| corrupt("state", e))?;
            return Ok(Some(if state.is_final() { Cancel::Ended(state) } else { Cancel::AttemptInFlight }));
        }
        notify(self.backend, &mut tx, format!("cancel {id} {job_id}")).await?;
        tx.commit().await.db()?;
        Ok(Some(Cancel::Cancelled { job_id, was }))
    }

    async fn attempts(&self, tenant_id: i64, id: SubscriptionId) -> Result<Option<Vec<AttemptRecord>>> {
        let exists: Option<i64> = sqlx::query_scalar(
            self.backend.sql("SELECT CAST(1 AS BIGINT) FROM subscriptions WHERE id = ? AND tenant_id = ?"),
        )
        .bind(id.to_string())
        .bind(tenant_id)
        .fetch_optional(&self.reader)
        .await
        .db()?;
        if exists.is_none() {
            return Ok(None);
        }
        let rows: Vec<(i64, i64, String, i64, Option<i64>, Option<String>, i64)> = sqlx::query_as(self.backend.sql(
            "SELECT series, attempt, webhook_id, started_at, status_code, error, duration_ms FROM delivery_attempts \
             WHERE subscription_id = ? ORDER BY id",
        ))
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
        let sql = format!("{POLLABLE_SELECT} GROUP BY j.job_id");
        let rows: Vec<PollableRow> = sqlx::query_as(self.backend.sql_fmt(sql)).fetch_all(&self.reader).await.db()?;
        rows.into_iter().map(PollableJob::try_from).collect()
    }

    async fn pollable_job(&self, job_id: JobId) -> Result<Option<PollableJob>> {
        let sql = format!("{POLLABLE_SELECT} WHERE j.job_id = ? GROUP BY j.job_id");
        let row: Option<PollableRow> = sqlx::query_as(self.backend.sql_fmt(sql))
            .bind(job_id.to_string())
            .fetch_optional(&self.reader)
            .await
            .db()?;
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
        let claim = self.claim_for(claim_for);
        self.write(Write::Complete { job_id, status, body: body.clone(), now, claim, reply }, answer).await
    }

    async fn claim_delivery(&self, task: &DeliveryTask, claim_for: Duration) -> Result<Claim> {
        let (reply, answer) = oneshot::channel();
        let claim = self.claim_for(claim_for);
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
        sqlx::query(self.backend.sql("UPDATE jobs SET last_error = ?, updated_at = ? WHERE job_id = ?"))
            .bind(last_error)
            .bind(now)
            .bind(&job)
            .execute(&mut *tx)
            .await
            .db()?;
        let done = sqlx::query(self.backend.sql("UPDATE subscriptions SET state = 'failed', failure_reason = ?, updated_at = ? WHERE job_id = ? AND state = 'polling'"))
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
        let expired = sqlx::query(self.backend.sql("UPDATE subscriptions SET state = 'expired', updated_at = ? WHERE job_id = ? AND state = 'polling' AND created_at <= ?"))
            .bind(now)
            .bind(&job)
            .bind(cutoff)
            .execute(&mut *tx)
            .await
            .db()?;
        let left = pollable_in(self.backend, &mut tx, &job).await?;
        tx.commit().await.db()?;
        Ok((expired.rows_affected(), left))
    }

    async fn count_by_state(&self) -> Result<Vec<(String, i64)>> {
        sqlx::query_as("SELECT state, COUNT(*) FROM subscriptions GROUP BY state").fetch_all(&self.reader).await.db()
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT COUNT(*) FROM meta").execute(&self.reader).await.db()?;
        // Writes failing lately (and none going through since) is not ready either. The mark lapses on
        // its own, so an idle instance whose disk recovered becomes ready without writing anything; if
        // the disk is still full, the next write marks it again.
        let failed_at = self.write_trouble.load(std::sync::atomic::Ordering::Relaxed);
        if failed_at > 0 && now_ms() - failed_at < WRITE_TROUBLE_FOR.as_millis() as Millis {
            return Err(StoreError::Unavailable(sqlx::Error::Protocol("writes are failing".into())));
        }
        Ok(())
    }

    fn writer_stats(&self) -> Arc<WriterStats> {
        self.stats.clone()
    }

    fn shared(&self) -> bool {
        self.backend == Backend::Postgres
    }

    async fn clock(&self) -> Result<Millis> {
        match self.backend {
            Backend::Postgres => {
                sqlx::query_scalar("SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)")
                    .fetch_one(&self.writer)
                    .await
                    .db()
            }
            // One process, one clock.
            Backend::Sqlite => Ok(now_ms()),
        }
    }

    async fn heartbeat(&self, instance: &str, now: Millis, live_after: Millis) -> Result<i64> {
        sqlx::query(self.backend.sql(
            "INSERT INTO instances (id, heartbeat_at) VALUES (?1, ?2) \
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        ))
        .bind(instance)
        .bind(now)
        .execute(&self.writer)
        .await
        .db()?;
        // Instances silent for ten times the liveness window are gone for good.
        sqlx::query(self.backend.sql("DELETE FROM instances WHERE heartbeat_at < ?"))
            .bind(live_after - 10 * (now - live_after))
            .execute(&self.writer)
            .await
            .db()?;
        sqlx::query_scalar(self.backend.sql("SELECT COUNT(*) FROM instances WHERE heartbeat_at > ?"))
            .bind(live_after)
            .fetch_one(&self.writer)
            .await
            .db()
    }

    async fn renew_leases(&self, instance: &str, until: Millis) -> Result<u64> {
        let held: Vec<i64> = sqlx::query_scalar(
            self.backend.sql("UPDATE leases SET expires_at = ? WHERE owner = ? RETURNING partition"),
        )
        .bind(until)
        .bind(instance)
        .fetch_all(&self.writer)
        .await
        .db()?;
        Ok(mask_of(&held))
    }

    async fn claim_leases(&self, instance: &str, n: i64, now: Millis, until: Millis) -> Result<u64> {
        // SKIP LOCKED: two instances claiming at once take different partitions, neither waits.
        let taken: Vec<i64> = sqlx::query_scalar(self.backend.pick(
            "UPDATE leases SET owner = ?1, expires_at = ?3 WHERE partition IN \
             (SELECT partition FROM leases WHERE owner IS NULL OR expires_at < ?2 ORDER BY random() LIMIT ?4) \
             RETURNING partition",
            "UPDATE leases SET owner = $1, expires_at = $3 WHERE partition IN \
             (SELECT partition FROM leases WHERE owner IS NULL OR expires_at < $2 ORDER BY random() LIMIT $4 \
              FOR UPDATE SKIP LOCKED) \
             RETURNING partition",
        ))
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
        sqlx::query(self.backend.sql(
            "UPDATE leases SET owner = NULL, expires_at = 0 WHERE owner = ? AND ((? >> CAST(partition AS INTEGER)) & 1) = 1",
        ))
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
        sqlx::query(self.backend.sql(
            "UPDATE subscriptions SET claimed_until = NULL, claimed_by = NULL WHERE state = 'delivering' AND claimed_by = ?",
        ))
        .bind(&*self.instance)
        .execute(&self.writer)
        .await
        .db()?;
        self.release_leases(instance, u64::MAX).await?;
        sqlx::query(self.backend.sql("DELETE FROM instances WHERE id = ?"))
            .bind(instance)
            .execute(&self.writer)
            .await
            .db()?;
        Ok(())
    }

    async fn pollable_jobs_in(&self, partitions: u64) -> Result<Vec<PollableJob>> {
        let sql = format!("{POLLABLE_SELECT} WHERE ((? >> CAST(j.partition AS INTEGER)) & 1) = 1 GROUP BY j.job_id");
        let rows: Vec<PollableRow> =
            sqlx::query_as(self.backend.sql_fmt(sql)).bind(partitions as i64).fetch_all(&self.reader).await.db()?;
        rows.into_iter().map(PollableJob::try_from).collect()
    }

    async fn pending_deliveries_in(&self, partitions: u64) -> Result<Vec<DeliveryTask>> {
        let sql =
            format!("{DELIVERY_SELECT} WHERE s.state = 'delivering' AND ((? >> CAST(s.partition AS INTEGER)) & 1) = 1");
        let rows: Vec<DeliveryRow> =
            sqlx::query_as(self.backend.sql_fmt(sql)).bind(partitions as i64).fetch_all(&self.reader).await.db()?;
        rows.into_iter().map(DeliveryTask::try_from).collect()
    }

    async fn delivery_task(&self, id: SubscriptionId) -> Result<Option<DeliveryTask>> {
        let sql = format!("{DELIVERY_SELECT} WHERE s.state = 'delivering' AND s.id = ?");
        let row: Option<DeliveryRow> =
            sqlx::query_as(self.backend.sql_fmt(sql)).bind(id.to_string()).fetch_optional(&self.reader).await.db()?;
        row.map(DeliveryTask::try_from).transpose()
    }

    async fn pending_deliveries(&self) -> Result<Vec<DeliveryTask>> {
        let sql = format!("{DELIVERY_SELECT} WHERE s.state = 'delivering'");
        let rows: Vec<DeliveryRow> = sqlx::query_as(self.backend.sql_fmt(sql)).fetch_all(&self.reader).await.db()?;
        rows.into_iter().map(DeliveryTask::try_from).collect()
    }

    async fn record_attempt(&self, record: &AttemptRecord, result: AttemptResult, now: Millis) -> Result<bool> {
        let (reply, answer) = oneshot::channel();
        self.write(Write::Attempt { record: record.clone(), result, now, reply }, answer).await
    }
}

async fn insert_tenant_with_key(
    b: Backend,
    tx: &mut Transaction<'static, Any>,
    name: &str,
    key: KeyHash,
    secret: &SigningSecret,
    source: &str,
    now: Millis,
) -> Result<i64> {
    let tenant_id: i64 = sqlx::query_scalar(
        b.sql("INSERT INTO tenants (name, signing_secret, created_at) VALUES (?, ?, ?) RETURNING id"),
    )
    .bind(name)
    .bind(secret.expose())
    .bind(now)
    .fetch_one(&mut **tx)
    .await
    .db()?;
    sqlx::query(b.sql("INSERT INTO api_keys (tenant_id, name, key_hash, source, created_at) VALUES (?, ?, ?, ?, ?)"))
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

// --- the writes that are group-committed (see `writer`) ---

/// The tenant of a usable API key, by the key's hash (checked inside the registering transaction).
const KEY_TENANT: &str = "SELECT tenant_id FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL";
/// The same on PostgreSQL, holding the key row until commit: a revocation waits for the registrations
/// already past this check, so once `keys revoke` returns, no registration with the key can commit.
const KEY_TENANT_PG: &str = "SELECT tenant_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL FOR SHARE";

async fn register_in(
    b: Backend,
    tx: &mut Transaction<'static, Any>,
    key: &KeyHash,
    id: SubscriptionId,
    job_id: JobId,
    callback_url: &CallbackUrl,
    now: Millis,
) -> Result<Registered> {
    let tenant_id: Option<i64> = sqlx::query_scalar(b.pick(KEY_TENANT, KEY_TENANT_PG))
        .bind(key.0.as_slice())
        .fetch_optional(&mut **tx)
        .await
        .db()?;
    let Some(tenant_id) = tenant_id else { return Ok(Registered::UnknownKey) };
    let job = job_id.to_string();
    // A write first, so this transaction holds the write lock before it reads: the job's result
    // cannot appear between our read and our insert.
    sqlx::query(b.sql(
        "INSERT INTO jobs (job_id, partition, created_at, updated_at) VALUES (?1, ?2, ?3, ?3) ON CONFLICT (job_id) DO NOTHING",
    ))
    .bind(&job)
    .bind(job_id.partition())
    .bind(now)
    .execute(&mut **tx)
    .await
    .db()?;
    // Lock the job's row (PostgreSQL; on SQLite the one writer connection already serialises us): a
    // concurrent registration of the same job, or the job's end, waits for this transaction. The same
    // statement reads what the new subscription needs to know of its job.
    let (job_created_at, job_status, last_error, result): (i64, Option<String>, Option<String>, Option<Vec<u8>>) =
        sqlx::query_as(b.sql(
            "UPDATE jobs SET updated_at = updated_at WHERE job_id = ? RETURNING created_at, status, last_error, result",
        ))
        .bind(&job)
        .fetch_one(&mut **tx)
        .await
        .db()?;
    let existing: Option<String> = sqlx::query_scalar(
        b.sql("SELECT id FROM subscriptions WHERE tenant_id = ? AND job_id = ? AND callback_url = ? AND state IN ('polling', 'delivering', 'delivered')"),
    )
    .bind(tenant_id)
    .bind(&job)
    .bind(callback_url.as_str())
    .fetch_optional(&mut **tx)
    .await
    .db()?;
    if let Some(existing) = existing {
        let sub = subscription_in(b, tx, &existing).await?;
        return Ok(Registered::Existing(sub));
    }
    let sub_id = id.to_string();
    // The new subscription as the API shows it, without reading it back.
    let new_subscription = |state, webhook_id, next_attempt_at| -> Result<Subscription> {
        Ok(Subscription {
            id,
            job_id,
            callback_url: callback_url.as_str().to_owned(),
            state,
            job_status: job_status.as_deref().map(str::parse).transpose().map_err(|e| corrupt("job status", e))?,
            failure_reason: None,
            last_error: last_error.clone(),
            webhook_id,
            attempts: 0,
            next_attempt_at,
            created_at: now,
            updated_at: now,
        })
    };
    match result {
        None => {
            sqlx::query(
                b.sql("INSERT INTO subscriptions (id, tenant_id, job_id, callback_url, state, created_at, updated_at, partition) \
                 VALUES (?1, ?2, ?3, ?4, 'polling', ?5, ?5, ?6)"),
            )
            .bind(&sub_id)
            .bind(tenant_id)
            .bind(&job)
            .bind(callback_url.as_str())
            .bind(now)
            .bind(job_id.partition())
            .execute(&mut **tx)
            .await
            .db()?;
            let sub = new_subscription(SubscriptionState::Polling, None, None)?;
            // A job created by this registration has no older subscription to expire first.
            let pollable = if job_created_at == now {
                PollableJob { job_id, job_created_at, oldest_polling_at: now }
            } else {
                pollable_in(b, tx, &job).await?.ok_or_else(|| corrupt("new subscription not polling", &sub_id))?
            };
            notify(b, tx, format!("poll {job}")).await?;
            Ok(Registered::CreatedPolling(sub, pollable))
        }
        Some(body) => {
            let webhook_id = new_webhook_id();
            sqlx::query(
                b.sql("INSERT INTO subscriptions (id, tenant_id, job_id, callback_url, state, webhook_id, next_attempt_at, created_at, updated_at, partition) \
                 VALUES (?1, ?2, ?3, ?4, 'delivering', ?5, ?6, ?6, ?6, ?7)"),
            )
            .bind(&sub_id)
            .bind(tenant_id)
            .bind(&job)
            .bind(callback_url.as_str())
            .bind(&webhook_id)
            .bind(now)
            .bind(job_id.partition())
            .execute(&mut **tx)
            .await
            .db()?;
            let sub = new_subscription(SubscriptionState::Delivering, Some(webhook_id.clone()), Some(now))?;
            notify(b, tx, format!("deliver {sub_id} {}", job_id.partition())).await?;
            let task = DeliveryTask::first(
                id,
                job_id,
                tenant_id,
                webhook_id,
                callback_url.as_str().to_owned(),
                body.into(),
                now,
            );
            Ok(Registered::CreatedDelivering(sub, task))
        }
    }
}

async fn complete_job_in(
    b: Backend,
    tx: &mut Transaction<'static, Any>,
    job_id: JobId,
    status: JobStatus,
    body: &Bytes,
    now: Millis,
    claim: &ClaimFor,
) -> Result<Vec<DeliveryTask>> {
    let job = job_id.to_string();
    let first = sqlx::query(b.sql(
        "UPDATE jobs SET status = ?, result = ?, last_error = NULL, finished_at = ?3, updated_at = ?3 \
         WHERE job_id = ?4 AND result IS NULL",
    ))
    .bind(status.as_str())
    .bind(body.as_ref())
    .bind(now)
    .bind(&job)
    .execute(&mut **tx)
    .await
    .db()?
    .rows_affected()
        == 1;
    if !first {
        // Already recorded (a retry after a commit whose answer was lost): hand out its deliveries again.
        return already_completed(b, tx, &job).await;
    }
    let subscribers: Vec<(String, i64, String)> = sqlx::query_as(
        b.sql("SELECT id, tenant_id, callback_url FROM subscriptions WHERE job_id = ? AND state = 'polling'"),
    )
    .bind(&job)
    .fetch_all(&mut **tx)
    .await
    .db()?;
    let mut tasks = Vec::with_capacity(subscribers.len());
    for (id, tenant_id, callback_url) in subscribers {
        let webhook_id = new_webhook_id();
        // Claimed for this instance's first attempt in the same write (see `Store::claim_delivery`).
        let moved = sqlx::query(b.pick(
            "UPDATE subscriptions SET state = 'delivering', webhook_id = ?1, attempts = 0, next_attempt_at = ?2, updated_at = ?2, \
             claimed_until = ?2 + ?4, claimed_by = ?5 WHERE id = ?3 AND state = 'polling'",
            concat!(
                "UPDATE subscriptions SET state = 'delivering', webhook_id = $1, attempts = 0, next_attempt_at = $2, updated_at = $2, \
                 claimed_until = ",
                pg_now_ms!(),
                " + $4, claimed_by = $5 WHERE id = $3 AND state = 'polling'"
            ),
        ))
        .bind(&webhook_id)
        .bind(now)
        .bind(&id)
        .bind(claim.ms)
        .bind(&*claim.by)
        .execute(&mut **tx)
        .await
        .db()?;
        if moved.rows_affected() == 0 {
            // Cancelled between our read and this update (PostgreSQL): not ours to deliver.
            continue;
        }
        let id = id.parse().map_err(|e| corrupt("subscription id", e))?;
        let mut task = DeliveryTask::first(id, job_id, tenant_id, webhook_id, callback_url, body.clone(), now);
        task.claimed_until = Some(claim.held_until);
        tasks.push(task);
    }
    Ok(tasks)
}

/// See [`Store::claim_delivery`].
async fn claim_in(
    b: Backend,
    tx: &mut Transaction<'static, Any>,
    id: SubscriptionId,
    series: u32,
    now: Millis,
    claim: &ClaimFor,
) -> Result<Claim> {
    let id = id.to_string();
    let taken = sqlx::query(b.pick(
        "UPDATE subscriptions SET claimed_until = ?1 + ?2, claimed_by = ?3 \
         WHERE id = ?4 AND state = 'delivering' AND series = ?5 AND (claimed_until IS NULL OR claimed_until <= ?1 OR claimed_by = ?3)",
        concat!(
            "UPDATE subscriptions SET claimed_until = ",
            pg_now_ms!(),
            " + $2, claimed_by = $3 WHERE id = $4 AND state = 'delivering' AND series = $5 AND $1 = $1 \
             AND (claimed_until IS NULL OR claimed_until <= ",
            pg_now_ms!(),
            " OR claimed_by = $3)"
        ),
    ))
    .bind(now)
    .bind(claim.ms)
    .bind(&*claim.by)
    .bind(&id)
    .bind(i64::from(series))
    .execute(&mut **tx)
    .await
    .db()?
    .rows_affected()
        == 1;
    if taken {
        return Ok(Claim::Held(claim.held_until));
    }
    let row: Option<(String, i64, Option<i64>)> =
        sqlx::query_as(b.sql("SELECT state, series, claimed_until FROM subscriptions WHERE id = ?"))
            .bind(&id)
            .fetch_optional(&mut **tx)
            .await
            .db()?;
    Ok(claim_refused(row, series, now))
}

/// Why a claim was not taken: another holder (until when), or the delivery is over.
fn claim_refused(row: Option<(String, i64, Option<i64>)>, series: u32, now: Millis) -> Claim {
    match row {
        Some((state, s, Some(until))) if state == "delivering" && s == i64::from(series) => Claim::Busy(until.max(now)),
        _ => Claim::Gone,
    }
}

/// The deliveries a completed job created, for a completion that is recorded a second time.
async fn already_completed(b: Backend, tx: &mut Transaction<'static, Any>, job: &str) -> Result<Vec<DeliveryTask>> {
    let sql =
        format!("{DELIVERY_SELECT} WHERE s.job_id = ? AND s.state = 'delivering' AND s.series = 1 AND s.attempts = 0");
    let rows: Vec<DeliveryRow> = sqlx::query_as(b.sql_fmt(sql)).bind(job).fetch_all(&mut **tx).await.db()?;
    rows.into_iter().map(DeliveryTask::try_from).collect()
}

async fn record_attempt_in(
    b: Backend,
    tx: &mut Transaction<'static, Any>,
    record: &AttemptRecord,
    result: AttemptResult,
    now: Millis,
) -> Result<bool> {
    let id = record.subscription_id.to_string();
    sqlx::query(
        b.sql("INSERT INTO delivery_attempts (subscription_id, series, attempt, webhook_id, started_at, status_code, error, duration_ms) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
    )
    .bind(&id)
    .bind(i64::from(record.series))
    .bind(i64::from(record.attempt))
    .bind(&record.webhook_id)
    .bind(record.started_at)
    .bind(record.status_code.map(i64::from))
    .bind(record.error.as_deref())
    .bind(i64::try_from(record.duration_ms).unwrap_or(i64::MAX))
    .execute(&mut **tx)
    .await
    .db()?;
    let (state, next_at, reason) = match result {
        AttemptResult::Delivered => ("delivered", None, None),
        AttemptResult::RetryAt(at) => ("delivering", Some(at), None),
        AttemptResult::Failed(reason) => ("failed", None, Some(reason.as_str())),
    };
    let moved = sqlx::query(b.sql(
        "UPDATE subscriptions SET state = ?, attempts = ?, next_attempt_at = ?, failure_reason = ?, updated_at = ?, \
         claimed_until = NULL, claimed_by = NULL WHERE id = ? AND state = 'delivering' AND series = ?",
    ))
    .bind(state)
    .bind(i64::from(record.attempt))
    .bind(next_at)
    .bind(reason)
    .bind(now)
    .bind(&id)
    .bind(i64::from(record.series))
    .execute(&mut **tx)
    .await
    .db()?;
    Ok(moved.rows_affected() == 1)
}

async fn record_observation_in(
    b: Backend,
    tx: &mut Transaction<'static, Any>,
    job_id: JobId,
    status: Option<JobStatus>,
    last_error: Option<&str>,
    now: Millis,
) -> Result<()> {
    sqlx::query(b.sql(
        "UPDATE jobs SET status = COALESCE(?, status), last_error = ?, updated_at = ? WHERE job_id = ? AND result IS NULL",
    ))
        .bind(status.map(|s| s.as_str()))
        .bind(last_error)
        .bind(now)
        .bind(job_id.to_string())
        .execute(&mut **tx)
        .await
        .db()?;
    Ok(())
}
