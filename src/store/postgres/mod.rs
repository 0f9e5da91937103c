//! The store on PostgreSQL, where several instances share one database: sqlx's native `PgPool`, every
//! statement written once in PostgreSQL's own SQL and prepared once per connection (sqlx caches them),
//! the group-committed writes in lanes (see `writer.rs`), and notices between instances (`notice.rs`).

mod api;
mod complete;
mod idempotency;
mod keys;
mod leases;
mod notice;
mod purge;
mod register;
mod retry_now;
mod store;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{
    PgArgumentBuffer, PgArguments, PgConnection, PgHasArrayType, PgPool, PgPoolOptions, PgTypeInfo, PgValueRef,
};
use sqlx::{Executor, Postgres, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::group::{ClaimFor, Write};
use super::rows::*;
use super::*;

use keys::insert_tenant_with_key;

// Times are BIGINT columns of Unix milliseconds.
impl sqlx::Type<Postgres> for Timestamp {
    fn type_info() -> PgTypeInfo {
        <i64 as sqlx::Type<Postgres>>::type_info()
    }
}

impl PgHasArrayType for Timestamp {
    fn array_type_info() -> PgTypeInfo {
        i64::array_type_info()
    }
}

impl sqlx::Encode<'_, Postgres> for Timestamp {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> std::result::Result<IsNull, BoxDynError> {
        self.as_millis().encode_by_ref(buf)
    }
}

impl sqlx::Decode<'_, Postgres> for Timestamp {
    fn decode(value: PgValueRef<'_>) -> std::result::Result<Self, BoxDynError> {
        i64::decode(value).map(Timestamp::from_millis)
    }
}
pub use notice::Notice;

/// `GET /v1/subscriptions`' statement for `filter` (see [`super::list_statement`]).
pub(super) fn list_statement(filter: &ListFilter) -> String {
    list_query(filter, "s.job_id = {p}")
}

/// What a bulk redelivery matches (see [`super::bulk_statement`]).
pub(super) fn bulk_statement(filter: &BulkFilter) -> String {
    super::bulk::matching_query(filter, "o.job_id = s.job_id")
}

/// How long a write batch may wait for PostgreSQL before it is abandoned (see [`writer`]).
const BATCH_DEADLINE: Duration = Duration::from_secs(15);

/// What every PostgreSQL connection is told at connect: no statement runs longer than
/// `statement_timeout`, none waits for a lock longer than `lock_timeout` (our transactions are short;
/// a longer wait is a stuck peer), a transaction left idle for 20 s is ended (ours never pause between
/// statements; one that does is on a connection its client has given up on, and its locks hold others
/// up), and the server probes an idle client with TCP keepalives, so a client that vanished releases
/// its locks within about a minute even outside a transaction. Every statement is planned for its own
/// arguments (`force_custom_plan`): a connection lives long, and a generic plan made while a table was
/// nearly empty (a sequential scan) would otherwise stay with it however large the table grows.
const PG_SESSION: &str = "SET statement_timeout = '30s'; SET lock_timeout = '10s'; \
     SET idle_in_transaction_session_timeout = '20s'; SET tcp_keepalives_idle = 30; \
     SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3; \
     SET plan_cache_mode = force_custom_plan";

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
    /// The group-committed writes go to the writer lanes (see [`writer`]): registrations to the first,
    /// every other write about one job to the same one of the others.
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

/// How many writer lanes for job ends, observations, claims and attempts (registrations have one more
/// of their own). Two: while one lane's batch waits for its commit (the WAL flush, a round trip), the
/// other's statements run. More lanes only split the same writes into smaller batches, and on
/// PostgreSQL a statement's fixed cost (parse, executor start, a round trip) is most of a small batch's:
/// measured on a 2-core box (20,000 jobs), 8 lanes made batches of ~12 writes and cost the server
/// 1.1 CPU-ms per job; 2 lanes made batches of ~50 at 0.55 CPU-ms, and took 1.4× the jobs per second
/// (one lane: ~1.1×, its batches wait for each other's commit); 4 lanes, once statements were planned
/// once per lane, took a quarter fewer jobs per second than 2. A batch grows with the load (see
/// `group::MAX_BATCH`), so two lanes are not a ceiling on a larger server. The registrations' own lane
/// keeps them from waiting behind a batch of a few hundred job ends (registration p99 65–74 ms against
/// 97–164 ms with registrations in the same lanes; 2 registration lanes cost 3 instances a quarter of
/// their jobs per second in smaller batches).
const LANES: usize = 2;

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
            .max_connections(8)
            .acquire_timeout(BUSY_TIMEOUT)
            // sqlx pings a connection on its way back to the pool (below), so another ping before each
            // use would only add a round trip per call.
            .test_before_acquire(false)
            // A connection comes back from a call that ran into [`CALL_DEADLINE`] still waiting for its
            // answer, and sqlx's own ping on release has no deadline: on a half-open connection it would
            // wait forever, keeping the connection's place in the pool. This ping has one; a
            // connection that does not answer it is closed instead of kept.
            .after_release(|conn, _| {
                Box::pin(async move {
                    Ok(tokio::time::timeout(RELEASE_PING_DEADLINE, sqlx::Connection::ping(conn))
                        .await
                        .is_ok_and(|p| p.is_ok()))
                })
            })
            .after_connect(|conn, _| Box::pin(async move { conn.execute(PG_SESSION).await.map(drop) }))
            .connect(url)
            .await
            .map_err(classify)?;
        // Bounded: when the database cannot keep up, callers wait here instead of piling up memory.
        // Each job's writes but its registrations go to one lane (by partition); see `writer.rs` for
        // why the registrations' lane and the others cannot deadlock.
        let sent = Arc::new(notice::Sent::default());
        let writes = (0..1 + LANES)
            .map(|_| {
                let (writes, queue) = mpsc::channel(8 * group::MAX_BATCH);
                tokio::spawn(writer::run(url.to_owned(), queue, stats.clone(), sent.clone()));
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
        // Registrations have a lane of their own (the first): they then never wait behind a batch of
        // job ends and deliveries, the heaviest writes (see `writer.rs` on how the two kinds of lane
        // lock the same jobs without deadlocks).
        let partition = usize::try_from(write.partition()).unwrap_or(0);
        let lane = if matches!(write, Write::Register { .. }) { 0 } else { 1 + partition % LANES };
        let queued = std::time::Instant::now();
        self.writes[lane].send(write).await.map_err(|_| gone())?;
        let done = answer.await.map_err(|_| gone())?;
        self.stats.write_seconds.observe(queued.elapsed().as_secs_f64());
        let trouble = if matches!(done, Err(StoreError::Unavailable(_))) { Timestamp::now().as_millis() } else { 0 };
        self.write_trouble.store(trouble, std::sync::atomic::Ordering::Relaxed);
        done
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>> {
        self.stats.transactions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.pool.begin().await.map_err(classify)
    }
}
use pg_now_ms;

/// How long a writer lane's statement waits for a row lock. Rows are locked only for the length of one
/// batch, and each job's writes go to one lane, so a longer wait means a stuck holder (another
/// instance's frozen connection, say): the batch then runs again write by write, so that the jobs not
/// locked go through.
const LANE_LOCK_TIMEOUT: &str = "SET lock_timeout = '2s'";

/// How a writer lane's statements are planned. Each of them reaches a handful of rows by key (a job, a
/// subscription, an API key: arrays of them, joined to `UNNEST`ed columns), so the one right plan is a
/// nested loop of index lookups, whatever the tables hold. The lane forbids the other join and scan
/// methods and plans each statement once per connection (a generic plan), instead of planning every
/// execution for its arguments, which cost PostgreSQL about a fifth of its CPU per job. Without the
/// ban a generic plan made while a table is nearly empty (a new store's first batches) would scan it,
/// and keep scanning it as it grows; with it, the plan is the same at every size. The pool's
/// connections (the API's reads, housekeeping) keep planning each statement for its arguments.
const LANE_PLANS: &str = "SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off; \
     SET enable_bitmapscan = off; SET enable_hashjoin = off; SET enable_mergejoin = off";

/// A writer lane's connection (outside the pool), set up as the pool's are but for a shorter lock wait
/// ([`LANE_LOCK_TIMEOUT`]); given up after [`BUSY_TIMEOUT`].
async fn connect(url: &str) -> Result<PgConnection> {
    let connecting = async {
        let mut conn = <PgConnection as sqlx::Connection>::connect(url).await?;
        conn.execute(PG_SESSION).await?;
        conn.execute(LANE_LOCK_TIMEOUT).await?;
        conn.execute(LANE_PLANS).await?;
        Ok::<_, sqlx::Error>(conn)
    };
    tokio::time::timeout(BUSY_TIMEOUT, connecting)
        .await
        .map_err(|_| StoreError::trouble(Trouble::ConnectTimeout(BUSY_TIMEOUT)))?
        .map_err(classify)
}

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
        // 40001/40P01 serialization failure and deadlock; 55P03 a lock not had within lock_timeout.
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            ["08", "53", "57", "58"].iter().any(|class| code.starts_with(class))
                || matches!(code.as_ref(), "25006" | "40001" | "40P01" | "55P03")
        }
        _ => false,
    };
    if unavailable { StoreError::Unavailable(Arc::new(e)) } else { StoreError::Other(Arc::new(e)) }
}

/// Whether `e` says the connection itself is gone or unusable (as opposed to one statement failing on a
/// working connection: a constraint, a lock wait, a deadlock).
fn connection_lost(e: &StoreError) -> bool {
    let (StoreError::Unavailable(cause) | StoreError::Other(cause)) = e else { return false };
    match cause.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(db)) => {
            let code = db.code().unwrap_or_default();
            ["08", "57"].iter().any(|class| code.starts_with(class))
        }
        Some(_) => true, // I/O, protocol, TLS: the stream is in an unknown state
        None => false,
    }
}

pub(super) trait Classify<T> {
    fn db(self) -> Result<T>;
}

impl<T> Classify<T> for std::result::Result<T, sqlx::Error> {
    fn db(self) -> Result<T> {
        self.map_err(classify)
    }
}

/// How long any one store call on the pool may wait for PostgreSQL. The server's `statement_timeout`
/// cannot end a wait on a connection that is half open or a backend that is stuck, and sqlx has no
/// client-side TCP keepalive: without this a read could wait forever, holding its caller (a request, the
/// lease heartbeat) with it.
const CALL_DEADLINE: Duration = Duration::from_secs(20);

/// How long a connection coming back to the pool may take to answer a ping.
const RELEASE_PING_DEADLINE: Duration = Duration::from_secs(5);

/// `call`, or "unavailable" once [`CALL_DEADLINE`] has passed; the connection it held is then checked on
/// its way back to the pool, and closed (see `after_release` in [`PgStore::open`]).
async fn deadline<T>(call: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(CALL_DEADLINE, call)
        .await
        .unwrap_or(Err(StoreError::trouble(Trouble::NoAnswer(CALL_DEADLINE))))
}

/// A read whose rows sqlx maps to `R`, a row type of `rows.rs`.
type ReadAs<R> = sqlx::query::QueryAs<'static, Postgres, R, PgArguments>;

impl PgStore {
    /// Every row of a read on the pool, each turned into the store's type, within the call deadline.
    async fn read_all<R, T>(&self, query: ReadAs<R>) -> Result<Vec<T>>
    where
        R: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
        T: TryFrom<R, Error = StoreError>,
    {
        deadline(async move { query.fetch_all(&self.pool).await.db()?.into_iter().map(T::try_from).collect() }).await
    }

    /// The row of a read on the pool, if there is one, turned into the store's type, within the call deadline.
    async fn read_one<R, T>(&self, query: ReadAs<R>) -> Result<Option<T>>
    where
        R: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
        T: TryFrom<R, Error = StoreError>,
    {
        deadline(async move { query.fetch_optional(&self.pool).await.db()?.map(T::try_from).transpose() }).await
    }
}

/// The rows a statement returns in `tx`, collected (into a set or a map, say).
async fn collect_rows<R, C>(
    tx: &mut PgConnection,
    query: sqlx::query::QueryAs<'_, Postgres, R, PgArguments>,
) -> Result<C>
where
    R: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
    C: FromIterator<R>,
{
    Ok(query.fetch_all(tx).await.db()?.into_iter().collect())
}

/// The one column a statement returns in `tx`, collected.
async fn collect_column<T, C>(
    tx: &mut PgConnection,
    query: sqlx::query::QueryScalar<'_, Postgres, T, PgArguments>,
) -> Result<C>
where
    (T,): for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    T: Send + Unpin,
    C: FromIterator<T>,
{
    Ok(query.fetch_all(tx).await.db()?.into_iter().collect())
}

/// Tells the other instances about work they may own: delivered when `tx` commits, or never.
async fn notify(tx: &mut PgConnection, sent: &notice::Sent, notice: Notice) -> Result<()> {
    let payload = notice.to_string();
    sent.record([&payload]);
    sqlx::query("SELECT pg_notify('jobhook', $1)").bind(payload).execute(&mut *tx).await.db()?;
    Ok(())
}

/// A tenant's subscription as a delivery (its job's result joined), read in `tx`.
async fn delivery_in(tx: &mut PgConnection, sub: TenantSub) -> Result<Option<DeliveryRow>> {
    let sql = concat!(delivery_select!(), " WHERE s.id = $1 AND s.tenant_id = $2");
    sqlx::query_as(sql).bind(sub.id.to_string()).bind(sub.tenant_id).fetch_optional(&mut *tx).await.db()
}

/// A subscription's state, read in `tx` (the subscription exists).
async fn state_in(tx: &mut PgConnection, sub_id: &str) -> Result<SubscriptionState> {
    let state: String = sqlx::query_scalar("SELECT state FROM subscriptions WHERE id = $1")
        .bind(sub_id)
        .fetch_one(&mut *tx)
        .await
        .db()?;
    state.parse().map_err(|e| corrupt("state", e))
}

pub(super) async fn pollable_in(tx: &mut PgConnection, job_id: &str) -> Result<Option<PollableJob>> {
    let sql = concat!(pollable_select!(), " WHERE j.job_id = $1 GROUP BY j.job_id");
    let row: Option<PollableRow> = sqlx::query_as(sql).bind(job_id).fetch_optional(&mut *tx).await.db()?;
    row.map(PollableJob::try_from).transpose()
}
