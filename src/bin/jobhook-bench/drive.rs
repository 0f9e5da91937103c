//! Load and measurement: concurrent exchanges, registrations, percentiles, /proc figures, and the
//! `jobhook serve` processes under test on their stores.

use super::*;

/// A fresh store: a SQLite file in `dir`, or a new schema in the PostgreSQL database at `url`.
pub(crate) async fn fresh_store(dir: &std::path::Path, url: Option<&str>) -> anyhow::Result<(String, Option<String>)> {
    let Some(base) = url else { return Ok((format!("sqlite://{}", dir.join("bench.db").display()), None)) };
    anyhow::ensure!(base.starts_with("postgres"), "--database-url must be a postgres:// URL (SQLite is the default)");
    let schema = format!("jobhook_bench_{}", uuid::Uuid::new_v4().simple());
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(base).await?;
    sqlx::Executor::execute(&mut conn, sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).await?;
    let separator = if base.contains('?') { '&' } else { '?' };
    Ok((format!("{base}{separator}options=-c%20search_path%3D{schema}"), Some(schema)))
}

pub(crate) async fn drop_store(url: Option<&str>, schema: Option<String>) {
    if let (Some(base), Some(schema)) = (url, schema)
        && let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(base).await
    {
        let _ = sqlx::Executor::execute(&mut conn, sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).await;
    }
}

pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

/// Runs `n` rounds of `exchange` with `concurrency` workers; returns rounds per second.
pub(crate) async fn rate<F, Fut>(n: usize, concurrency: usize, exchange: F) -> f64
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let exchange = Arc::new(exchange);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (exchange, next) = (exchange.clone(), next.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    break;
                }
                exchange(i).await;
            }
        });
    }
    while workers.join_next().await.is_some() {}
    n as f64 / start.elapsed().as_secs_f64()
}

/// A memory figure of a process from /proc/PID/status (`VmRSS`, `VmHWM`), in bytes.
pub(crate) fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Current resident memory of a process (bytes).
pub(crate) fn rss(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS")
}

/// One registration; whether it answered 201 Created.
pub(crate) async fn register_one(http: &reqwest::Client, listen: SocketAddr, job: &str, callback: &str) -> bool {
    let sent = http
        .post(format!("http://{listen}/v1/subscriptions"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(json!({ "job_id": job, "callback_url": callback }).to_string())
        .send()
        .await;
    let created = matches!(&sent, Ok(r) if r.status() == StatusCode::CREATED);
    if let Ok(r) = sent {
        let _ = r.bytes().await;
    }
    created
}

/// Registers `jobs` with `concurrency` clients; returns registrations per second.
pub(crate) async fn register_all(
    http: &reqwest::Client,
    listen: SocketAddr,
    callback: String,
    jobs: Arc<Vec<String>>,
    concurrency: usize,
) -> f64 {
    let http = http.clone();
    rate(jobs.len(), concurrency, move |i| {
        let (http, job, callback) = (http.clone(), jobs[i].clone(), callback.clone());
        async move {
            register_one(&http, listen, &job, &callback).await;
        }
    })
    .await
}

/// Waits until every job in `jobs` was polled at or after `since`; returns when that happened.
pub(crate) async fn all_polled_since(
    upstream: &Upstream,
    jobs: &[String],
    since: Instant,
    deadline: Duration,
) -> Option<Instant> {
    let ids: Vec<uuid::Uuid> = jobs.iter().filter_map(|j| uuid::Uuid::try_parse(j).ok()).collect();
    let give_up = Instant::now() + deadline;
    loop {
        let mut latest = since;
        let all = ids.iter().all(|id| match upstream.shard(id).lock().unwrap().get(id).and_then(|e| e.last_poll) {
            Some(at) if at >= since => {
                latest = latest.max(at);
                true
            }
            _ => false,
        });
        if all {
            return Some(latest);
        }
        if Instant::now() > give_up {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// jobhook's CPU seconds (user + system) and peak resident memory (bytes), from /proc.
pub(crate) fn process_usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // After the ")": state is field 0, utime 11, stime 12 (clock ticks of 1/100 s on Linux).
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    (cpu, status_bytes(pid, "VmHWM"))
}

/// A running `jobhook serve`, and the store-transaction count it reports when it stops.
pub(crate) struct Jobhook {
    pub(crate) child: tokio::process::Child,
    pub(crate) pid: u32,
    pub(crate) transactions: Arc<Mutex<Option<u64>>>,
}

/// Starts `jobhook serve` on the store at `db_url` and waits until it listens.
pub(crate) async fn start_jobhook(
    binary: &std::path::Path,
    db_url: &str,
    listen: SocketAddr,
    upstream_addr: SocketAddr,
    poll_interval: &str,
) -> anyhow::Result<Jobhook> {
    let mut child = tokio::process::Command::new(binary)
        .arg("serve")
        .env("JOBHOOK_LISTEN", listen.to_string())
        .env("JOBHOOK_DATABASE_URL", db_url)
        .env("JOBHOOK_UPSTREAM_URL", format!("http://{upstream_addr}"))
        .env("JOBHOOK_API_KEYS", KEY)
        .env("JOBHOOK_SIGNING_SECRET", SECRET)
        .env("JOBHOOK_ALLOW_PRIVATE_CALLBACKS", "true")
        .env("JOBHOOK_UPSTREAM_MAX_RPS", "0")
        // Every callback goes to the benchmark's one receiver host: the per-host cap (32 by default, there
        // to keep a slow host from taking every slot) would be the benchmark's ceiling.
        .env("JOBHOOK_DELIVERY_CONCURRENCY_PER_HOST", "256")
        .env("JOBHOOK_POLL_INTERVAL", poll_interval)
        .env("JOBHOOK_POLL_MAX_INTERVAL", poll_interval)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().unwrap_or(0);
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(20), stderr.next_line()).await??;
        match line {
            Some(line) if line.contains("listening on") => break,
            Some(_) => {}
            None => anyhow::bail!("jobhook exited before listening"),
        }
    }
    let transactions = Arc::new(Mutex::new(None::<u64>));
    {
        let transactions = transactions.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                // jobhook's own complaints belong in the benchmark's output: a run with errors is not clean.
                if line.contains("ERROR") || line.contains("WARN") {
                    eprintln!("jobhook: {line}");
                }
                if let Some(n) = line
                    .split("store_transactions=")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|n| n.parse().ok())
                {
                    *transactions.lock().unwrap() = Some(n);
                }
            }
        });
    }
    Ok(Jobhook { child, pid, transactions })
}
