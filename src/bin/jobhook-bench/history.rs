//! `--history N`: a store that already holds N finished subscriptions (each delivered, with its job and
//! one attempt), all belonging to the benchmark's own key, so the measured run, its `/metrics` scrapes and
//! its list queries meet a store with a long past. Inserted by the database itself from a generated
//! series, a million rows in seconds.
//!
//! The past looks like a real one: the subscriptions were made and ended one after another, about 35 a
//! second ([`HISTORY_GAP_MS`]; 3,000,000 are a day), the last of them `--history-age` ago, and their IDs
//! are UUIDv7 of those instants, as jobhook's own are; the job IDs are random, as an upstream's are. (A
//! history with random subscription IDs would put every index keyed by subscription in random order, which
//! no store jobhook wrote has, and make a purge of it touch several times the pages a real one does.)

use std::time::{Duration, Instant};

use jobhook::domain::Timestamp;
use jobhook::keys::{ApiKey, SigningSecret};

/// `--history N`: fills the store at `db_url`, or copies `--history-cache` in when it exists (and
/// keeps a copy there after filling when it does not).
pub async fn prepare(db_url: &str, args: &crate::Args) -> anyhow::Result<()> {
    if args.history == 0 {
        return Ok(());
    }
    let file = jobhook::store::sqlite_file(db_url).map(std::path::PathBuf::from);
    let cache = args.history_cache.as_deref();
    anyhow::ensure!(cache.is_none() || file.is_some(), "--history-cache is for SQLite stores only");
    if let (Some(cache), Some(file)) = (cache, &file)
        && cache.exists()
    {
        let started = Instant::now();
        std::fs::copy(cache, file)?;
        settle(file)?;
        let took = started.elapsed().as_secs_f64();
        jobhook::outln!("history: copied {} (made with --history {}) in {took:.1} s", cache.display(), args.history);
        return Ok(());
    }
    let took = prefill(db_url, crate::KEY, crate::SECRET, args.history, args.history_age).await?;
    jobhook::outln!("history: {} finished subscriptions stored in {:.1} s", args.history, took.as_secs_f64());
    if let (Some(cache), Some(file)) = (cache, &file) {
        // The fill ends with a truncating checkpoint: the file alone is the whole store.
        std::fs::copy(file, cache)?;
        settle(cache)?;
    }
    if let Some(file) = &file {
        settle(file)?;
    }
    Ok(())
}

/// Writes a freshly filled or copied store to disk before the measured run. Otherwise the kernel writes
/// its gigabytes back during the run, and each of jobhook's commits (an fsync) waits behind that: a store
/// with a long past in service has no such backlog.
fn settle(file: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(file)?.sync_all()
}

/// The time between two history subscriptions: about 35 a second.
const HISTORY_GAP_MS: i64 = 28;

/// Fills the store at `db_url` (migrated here, as jobhook would) with `n` delivered subscriptions of the
/// tenant of `key`, the last of them ended `age` ago.
pub async fn prefill(db_url: &str, key: &str, secret: &str, n: usize, age: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let store = jobhook::store::open(db_url).await?;
    let key = ApiKey::new_configured(key).map_err(anyhow::Error::msg)?;
    let secret: SigningSecret = secret.parse().map_err(anyhow::Error::msg)?;
    let now = Timestamp::now();
    store.sync_configured_keys(jobhook::store::KeyConfig { keys: &[key.hash()], secret: Some(&secret) }, now).await?;
    // When they ended.
    let now = now - age;
    let tenant = store.tenant_by_key(key.hash()).await?.ok_or_else(|| anyhow::anyhow!("the key has no tenant"))?.id;
    drop(store);
    let body = r#"{"job_id":"00000000-0000-4000-8000-000000000000","status":"Succeed","image_urls":["https://images.example.com/x/0.png"]}"#;
    if db_url.starts_with("postgres") {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(db_url).await?;
        sqlx::query(
            "CREATE TEMP TABLE history AS SELECT gen_random_uuid()::text AS job_id, \
             regexp_replace(lpad(to_hex(at), 12, '0') || '7' || substr(r, 1, 3) || '8' || substr(r, 4, 15), \
               '(.{8})(.{4})(.{4})(.{4})(.{12})', '\\1-\\2-\\3-\\4-\\5') AS id, \
             at, CAST(floor(random() * 64) AS BIGINT) AS partition \
             FROM (SELECT CAST($2 - ($1 - i) * $3 AS BIGINT) AS at, md5(random()::text) AS r \
                   FROM generate_series(1, $1) AS i) AS g",
        )
        .bind(n as i64)
        .bind(now)
        .bind(HISTORY_GAP_MS)
        .execute(&mut conn)
        .await?;
        sqlx::query(
            "INSERT INTO jobs (job_id, partition, status, result, created_at, updated_at, finished_at) \
             SELECT job_id, partition, 'Succeed', convert_to($1, 'UTF8'), at, at, at FROM history ORDER BY at",
        )
        .bind(body)
        .execute(&mut conn)
        .await?;
        sqlx::query(
            "INSERT INTO subscriptions (id, tenant_id, job_id, callback_url, state, webhook_id, attempts, created_at, \
             updated_at, partition) SELECT id, $1, job_id, 'https://receiver.example/hook', 'delivered', \
             'msg_' || replace(id, '-', ''), 1, at, at, partition FROM history ORDER BY at",
        )
        .bind(tenant)
        .execute(&mut conn)
        .await?;
        sqlx::query(
            "INSERT INTO delivery_attempts (subscription_id, series, attempt, webhook_id, started_at, status_code, duration_ms) \
             SELECT id, 1, 1, 'msg_' || replace(id, '-', ''), at, 204, 3 FROM history ORDER BY at",
        )
        .execute(&mut conn)
        .await?;
        sqlx::query("DROP TABLE history").execute(&mut conn).await?;
        sqlx::query("ANALYZE").execute(&mut conn).await?;
    } else {
        let path = jobhook::store::sqlite_file(db_url).ok_or_else(|| anyhow::anyhow!("not a SQLite file URL"))?;
        let conn = rusqlite::Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "OFF")?;
        conn.execute_batch("BEGIN")?;
        conn.execute(
            "CREATE TEMP TABLE history AS WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) \
             SELECT ?2 - (?1 - i) * ?3 AS at, lower(hex(randomblob(16))) AS job, \
             printf('%012x', ?2 - (?1 - i) * ?3) || lower(hex(randomblob(10))) AS sub, abs(random()) % 64 AS partition FROM n",
            rusqlite::params![n as i64, now, HISTORY_GAP_MS],
        )?;
        let uuid = |c: &str, version: char| {
            format!(
                "substr({c},1,8)||'-'||substr({c},9,4)||'-{version}'||substr({c},14,3)||'-8'||substr({c},18,3)||'-'||substr({c},21,12)"
            )
        };
        let (job, sub) = (uuid("job", '4'), uuid("sub", '7'));
        conn.execute(
            &format!("INSERT INTO jobs (job_id, partition, status, result, created_at, updated_at, finished_at) SELECT {job}, partition, 'Succeed', CAST(?1 AS BLOB), at, at, at FROM history ORDER BY at"),
            rusqlite::params![body],
        )?;
        conn.execute(
            &format!("INSERT INTO subscriptions (id, tenant_id, job_id, callback_url, state, webhook_id, attempts, created_at, updated_at, partition, job_created_at) SELECT {sub}, ?1, {job}, 'https://receiver.example/hook', 'delivered', 'msg_' || sub, 1, at, at, partition, at FROM history ORDER BY at"),
            rusqlite::params![tenant],
        )?;
        conn.execute(
            &format!("INSERT INTO delivery_attempts (subscription_id, series, attempt, webhook_id, started_at, status_code, duration_ms) SELECT {sub}, 1, 1, 'msg_' || sub, at, 204, 3 FROM history ORDER BY at"),
            [],
        )?;
        conn.execute_batch("DROP TABLE history; COMMIT; PRAGMA wal_checkpoint(TRUNCATE);")?;
    }
    Ok(started.elapsed())
}

/// The store's size on disk: the SQLite file with its WAL, or the PostgreSQL schema's tables and indexes.
pub async fn store_bytes(db_url: &str) -> Option<u64> {
    if db_url.starts_with("postgres") {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(db_url).await.ok()?;
        let bytes: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(pg_total_relation_size(c.oid)), 0) AS BIGINT) FROM pg_class c \
             JOIN pg_namespace s ON s.oid = c.relnamespace WHERE s.nspname = current_schema() AND c.relkind = 'r'",
        )
        .fetch_one(&mut conn)
        .await
        .ok()?;
        u64::try_from(bytes).ok()
    } else {
        let path = jobhook::store::sqlite_file(db_url)?;
        let size = |p: String| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        Some(size(path.to_owned()) + size(format!("{path}-wal")))
    }
}

/// Times `n` requests of `url` (sequential), in ms, sorted.
pub async fn timed(http: &reqwest::Client, url: &str, key: Option<&str>, n: usize) -> Vec<f64> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut request = http.get(url);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Ok(response) = request.send().await {
            let _ = response.bytes().await;
        }
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    times
}

/// Seconds each of 150 list requests took (50 by state failed, 50 by a job, 50 by state delivered),
/// sorted.
pub async fn timed_lists(http: &reqwest::Client, listen: &str, key: &str, job: &str) -> Vec<f64> {
    let list_url = |query: &str| format!("http://{listen}/v1/subscriptions?limit=50&{query}");
    let mut lists = timed(http, &list_url("state=failed"), Some(key), 50).await;
    lists.extend(timed(http, &list_url(&format!("job_id={job}")), Some(key), 50).await);
    lists.extend(timed(http, &list_url("state=delivered"), Some(key), 50).await);
    lists.sort_by(f64::total_cmp);
    lists
}
