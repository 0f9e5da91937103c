//! `jobhook-bench`: measures jobhook against this machine's own limit, in one run.
//!
//! It starts a fast upstream simulator and a callback receiver on loopback, and the real `jobhook serve`
//! binary (built beside this one) as a child process on a fresh SQLite store. First it measures the
//! limit: the rate at which it completes, itself, the three HTTP exchanges one job needs (a
//! registration-sized POST, a poll-sized GET, a callback-sized POST) at the same concurrency. Then it
//! registers N jobs, each finishing upstream after K Pending answers, and reports end-to-end jobs/s and
//! its ratio to the limit, registration latency, delivery lag after the terminal poll, polls per job,
//! jobhook's CPU time and peak memory, and store transactions per job. Every callback's signature is
//! checked, and duplicates and losses are counted.
//!
//!     cargo run --release --bin jobhook-bench -- [--jobs 100000] [--concurrency 64] [--pending-polls 2] [--json]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use jobhook::delivery::signing;
use jobhook::keys::SigningSecret;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

mod history;
mod pending;
mod proc;
mod servers;
mod soak;
mod text;

use proc::*;
use servers::*;
use text::*;

#[derive(Debug, Parser)]
#[command(name = "jobhook-bench", about = "Measures jobhook against this machine's limit")]
struct Args {
    /// Jobs to push through.
    #[arg(long, default_value_t = 100_000)]
    jobs: usize,
    /// Concurrent registrations (and concurrent exchanges when measuring the limit).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Pending answers before a job ends upstream.
    #[arg(long, default_value_t = 2)]
    pending_polls: u32,
    /// jobhook's --poll-interval.
    #[arg(long, default_value = "1s")]
    poll_interval: String,
    /// The jobhook binary (default: the one built beside this benchmark).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Print the results as JSON too.
    #[arg(long)]
    json: bool,
    /// Instead: hold N subscriptions pending, and report memory, poll lateness and restart recovery.
    #[arg(long)]
    pending: Option<usize>,
    /// The poll interval of --pending mode (long, as for jobs that take a while).
    #[arg(long, default_value = "10s")]
    pending_interval: String,
    /// A PostgreSQL database to run on (`postgres://…`); the benchmark makes a schema of its own in it and
    /// drops it at the end. Default: a fresh SQLite file.
    #[arg(long)]
    database_url: Option<String>,
    /// How many `jobhook serve` processes share the store (PostgreSQL only); registrations go round-robin.
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Fill the store with N finished (delivered) subscriptions of the benchmark's key before the run, and
    /// report the /metrics scrape time, list query times and the store's size.
    #[arg(long, default_value_t = 0)]
    history: usize,
    /// How long ago the --history subscriptions ended (e.g. 2d). With jobhook's retention set shorter
    /// (JOBHOOK_RETENTION and JOBHOOK_HOUSEKEEPING_SCHEDULE in the environment pass through to jobhook),
    /// housekeeping purges them during the measured run.
    #[arg(long, default_value = "0s", value_parser = jobhook::config::parse_duration)]
    history_age: Duration,
    /// SQLite only: a copy of the --history store kept at this path. When the file exists it is copied in
    /// instead of filling the store again (3,000,000 rows take ~13 minutes here); otherwise the filled
    /// store is copied there. Its rows keep the age they had when it was made, plus the time since.
    #[arg(long)]
    history_cache: Option<PathBuf>,
    /// Instead: steady traffic for this long (e.g. 15m) at --rate, sampling store size and RSS (see soak.rs).
    #[arg(long, value_parser = jobhook::config::parse_duration)]
    soak: Option<Duration>,
    /// --soak's jobs per second.
    #[arg(long, default_value_t = 500)]
    rate: u64,
}

/// A fresh store: a SQLite file in `dir`, or a new schema in the PostgreSQL database at `url`.
async fn fresh_store(dir: &std::path::Path, url: Option<&str>) -> anyhow::Result<(String, Option<String>)> {
    let Some(base) = url else { return Ok((format!("sqlite://{}", dir.join("bench.db").display()), None)) };
    anyhow::ensure!(base.starts_with("postgres"), "--database-url must be a postgres:// URL (SQLite is the default)");
    let schema = format!("jobhook_bench_{}", uuid::Uuid::new_v4().simple());
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(base).await?;
    sqlx::Executor::execute(&mut conn, sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).await?;
    let separator = if base.contains('?') { '&' } else { '?' };
    // The schema's name doubles as the connections' application_name, so the run's backends can be found.
    Ok((format!("{base}{separator}options=-c%20search_path%3D{schema}&application_name={schema}"), Some(schema)))
}

async fn drop_store(url: Option<&str>, schema: Option<String>) {
    if let (Some(base), Some(schema)) = (url, schema)
        && let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(base).await
    {
        let _ = sqlx::Executor::execute(&mut conn, sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).await;
    }
}

const KEY: &str = "bench-key-0123456789abcdef";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

/// Runs `n` rounds of `exchange` with `concurrency` workers; returns rounds per second.
async fn rate<F, Fut>(n: usize, concurrency: usize, exchange: F) -> f64
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

/// One registration; whether it answered 201 Created.
async fn register_one(http: &reqwest::Client, listen: SocketAddr, job: &str, callback: &str) -> bool {
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
async fn register_all(
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

/// A running `jobhook serve`, and the store-transaction count it reports when it stops.
struct Jobhook {
    child: tokio::process::Child,
    pid: u32,
    transactions: Arc<Mutex<Option<u64>>>,
}

/// Starts `jobhook serve` on the store at `db_url` and waits until it listens.
async fn start_jobhook(
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    jobhook::install_crypto();
    let binary = match &args.binary {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("jobhook"),
    };
    anyhow::ensure!(binary.exists(), "no jobhook binary at {} (build it: cargo build --release)", binary.display());

    if let Some(n) = args.pending {
        return pending::pending_mode(&args, &binary, n).await;
    }
    if let Some(duration) = args.soak {
        return soak::soak_mode(&args, &binary, duration).await;
    }
    let (upstream, upstream_addr) = Upstream::start(args.pending_polls, None).await;
    let receiver = Receiver::new()?;
    let receiver_addr = serve(
        axum::Router::new()
            .route("/hook", post(callback))
            .route("/limit/register", post(|body: Bytes| async move { (StatusCode::CREATED, body) }))
            .route("/limit/callback", post(|| async { StatusCode::NO_CONTENT }))
            .with_state(receiver.clone()),
    )
    .await;
    let http = reqwest::Client::builder().pool_max_idle_per_host(args.concurrency).build()?;

    // 1. The machine's limit: the three exchanges of one job, made by the benchmark itself.
    let limit_jobs = args.jobs.min(20_000);
    let limit_ids: Arc<Vec<String>> = Arc::new((0..limit_jobs).map(|_| uuid::Uuid::new_v4().to_string()).collect());
    let registration =
        format!(r#"{{"job_id":"{}","callback_url":"http://{receiver_addr}/hook"}}"#, uuid::Uuid::new_v4());
    let callback_body = format!(
        r#"{{"job_id":"{}","status":"Succeed","image_urls":["https://images.example.com/x/0.png"]}}"#,
        uuid::Uuid::new_v4()
    );
    let limit = {
        let (http, ids) = (http.clone(), limit_ids.clone());
        rate(limit_jobs, args.concurrency, move |i| {
            let (http, id, registration, callback_body) =
                (http.clone(), ids[i].clone(), registration.clone(), callback_body.clone());
            async move {
                let _ = http
                    .post(format!("http://{receiver_addr}/limit/register"))
                    .body(registration)
                    .send()
                    .await
                    .map(|r| r.bytes());
                if let Ok(r) = http.get(format!("http://{upstream_addr}/public/v1/job/{id}")).send().await {
                    let _ = r.bytes().await;
                }
                let _ = http.post(format!("http://{receiver_addr}/limit/callback")).body(callback_body).send().await;
            }
        })
        .await
    };
    // The limit run's polls are not jobhook's.
    upstream.polls.store(0, Ordering::Relaxed);

    // 2. jobhook on a fresh store.
    let dir = std::env::temp_dir().join(format!("jobhook-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    anyhow::ensure!(
        args.instances >= 1 && (args.instances == 1 || args.database_url.is_some()),
        "--instances above 1 needs --database-url postgres://… (SQLite is one process's store)"
    );
    let (db_url, schema) = fresh_store(&dir, args.database_url.as_deref()).await?;
    history::prepare(&db_url, &args).await?;
    let mut instances = Vec::new();
    let mut listens = Vec::new();
    for _ in 0..args.instances {
        let listen = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
            probe.local_addr()?
        };
        instances.push(start_jobhook(&binary, &db_url, listen, upstream_addr, &args.poll_interval).await?);
        listens.push(listen);
    }
    if args.instances > 1 {
        // Let the instances see each other and share the partitions before the clock starts.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let listens = Arc::new(listens);
    let cpu_before: f64 = instances.iter().map(|j| process_usage(j.pid).0).sum();
    let pg_before = match (args.database_url.as_deref(), schema.as_deref()) {
        (Some(base), Some(schema)) => Some(postgres_cpu(base, schema).await),
        _ => None,
    };

    // 3. N jobs through jobhook.
    let jobs: Arc<Vec<String>> = Arc::new((0..args.jobs).map(|_| uuid::Uuid::new_v4().to_string()).collect());
    let bar = ProgressBar::new(args.jobs as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} delivered {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(args.jobs)));
    let failures = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let registering = {
        let (http, jobs, latencies, failures) = (http.clone(), jobs.clone(), latencies.clone(), failures.clone());
        let callback = format!("http://{receiver_addr}/hook");
        let concurrency = args.concurrency;
        let n = args.jobs;
        let listens = listens.clone();
        tokio::spawn(rate(n, concurrency, move |i| {
            let (http, job, latencies, failures, callback) =
                (http.clone(), jobs[i].clone(), latencies.clone(), failures.clone(), callback.clone());
            let listen = listens[i % listens.len()];
            async move {
                let t = Instant::now();
                let ok = register_one(&http, listen, &job, &callback).await;
                latencies.lock().unwrap().push(t.elapsed().as_secs_f64() * 1000.0);
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }))
    };
    let mut last_progress = (0, Instant::now());
    let mut registered_in = None;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let got = receiver.seen.lock().unwrap().len();
        bar.set_position(got as u64);
        if registered_in.is_none() && registering.is_finished() {
            registered_in = Some(start.elapsed());
            bar.set_message("(all registered)");
        }
        if got >= args.jobs {
            break;
        }
        if got != last_progress.0 {
            last_progress = (got, Instant::now());
        } else if last_progress.1.elapsed() > Duration::from_secs(60) {
            bar.println("no callback for 60 s: stopping");
            break;
        }
    }
    let registration_secs = registered_in.unwrap_or_else(|| start.elapsed()).as_secs_f64();
    bar.finish_and_clear();
    let seen = receiver.seen.lock().unwrap().clone();
    let last_callback = seen.values().filter_map(|s| s.first_at).max().unwrap_or_else(Instant::now);
    let elapsed = last_callback.duration_since(start).as_secs_f64();
    // jobhook's own view of where the time went, from its /metrics (the first instance).
    let metrics = match http.get(format!("http://{}/metrics", listens[0])).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let usage: Vec<(f64, u64)> = instances.iter().map(|j| process_usage(j.pid)).collect();
    let cpu_after: f64 = usage.iter().map(|u| u.0).sum();
    let pg_cpu = match (pg_before.as_ref(), args.database_url.as_deref(), schema.as_deref()) {
        (Some(before), Some(base), Some(schema)) => Some(postgres_cpu_since(before, postgres_cpu(base, schema).await)),
        _ => None,
    };
    // A store with a past: what scraping and listing cost now, and how big it is.
    let scrape = history::timed(&http, &format!("http://{}/metrics", listens[0]), None, 20).await;
    let lists = history::timed_lists(&http, &listens[0].to_string(), KEY, &jobs[0]).await;
    let store_bytes = history::store_bytes(&db_url).await;
    let peak_rss = usage.iter().map(|u| u.1).max().unwrap_or(0);

    // Stop jobhook gracefully, so it reports its store transactions.
    let mut transactions = Some(0u64);
    for Jobhook { mut child, pid, transactions: reported } in instances {
        let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let reported = *reported.lock().unwrap();
        transactions = transactions.zip(reported).map(|(a, b)| a + b);
    }
    let _ = std::fs::remove_dir_all(&dir);
    drop_store(args.database_url.as_deref(), schema).await;

    // 4. Figures.
    let delivered = jobs.iter().filter(|j| seen.contains_key(*j)).count();
    let duplicates: u64 = seen.values().map(|s| u64::from(s.count.saturating_sub(1))).sum();
    let split_ids = seen.values().filter(|s| s.webhook_ids.len() > 1).count();
    let mut lags: Vec<f64> = {
        let mut lags = Vec::with_capacity(seen.len());
        for (job, s) in &seen {
            let Ok(id) = uuid::Uuid::try_parse(job) else { continue };
            let terminal = upstream.shard(&id).lock().unwrap().get(&id).and_then(|e| e.terminal_at);
            if let (Some(terminal), Some(first)) = (terminal, s.first_at) {
                lags.push(first.saturating_duration_since(terminal).as_secs_f64() * 1000.0);
            }
        }
        lags
    };
    lags.sort_by(f64::total_cmp);
    let mut latencies = latencies.lock().unwrap().clone();
    latencies.sort_by(f64::total_cmp);
    let jobs_per_s = delivered as f64 / elapsed;
    let polls = upstream.polls.load(Ordering::Relaxed) as f64;
    let cpu = cpu_after - cpu_before;
    let store = if args.database_url.is_some() { "PostgreSQL" } else { "SQLite" };
    let results = json!({
        "jobs": args.jobs,
        "store": store,
        "instances": args.instances,
        "concurrency": args.concurrency,
        "pending_polls": args.pending_polls,
        "poll_interval": args.poll_interval,
        "limit_jobs_per_s": limit.round(),
        "jobs_per_s": jobs_per_s.round(),
        "ratio_to_limit": (jobs_per_s / limit * 100.0).round() / 100.0,
        "registrations_per_s": (args.jobs as f64 / registration_secs).round(),
        "registration_ms_p50": (percentile(&latencies, 0.50) * 10.0).round() / 10.0,
        "registration_ms_p99": (percentile(&latencies, 0.99) * 10.0).round() / 10.0,
        "delivery_lag_ms_p50": (percentile(&lags, 0.50) * 10.0).round() / 10.0,
        "delivery_lag_ms_p99": (percentile(&lags, 0.99) * 10.0).round() / 10.0,
        "polls_per_job": (polls / args.jobs as f64 * 100.0).round() / 100.0,
        "cpu_seconds_per_1000_jobs": (cpu / args.jobs as f64 * 1000.0 * 1000.0).round() / 1000.0,
        "postgres_cpu_seconds_per_1000_jobs": pg_cpu.map(|c| (c / args.jobs as f64 * 1000.0 * 1000.0).round() / 1000.0),
        "peak_rss_mb": (peak_rss as f64 / 1048576.0 * 10.0).round() / 10.0,
        "store_transactions_per_job": transactions.map(|t| (t as f64 / args.jobs as f64 * 1000.0).round() / 1000.0),
        "delivered": delivered,
        "lost": args.jobs - delivered,
        "duplicates": duplicates,
        "jobs_under_several_webhook_ids": split_ids,
        "bad_signatures": receiver.bad_signatures.load(Ordering::Relaxed),
        "failed_registrations": failures.load(Ordering::Relaxed),
        "history": args.history,
        "metrics_scrape_ms_p50": (percentile(&scrape, 0.5) * 10.0).round() / 10.0,
        "metrics_scrape_ms_max": (scrape.last().copied().unwrap_or(0.0) * 10.0).round() / 10.0,
        "list_ms_p99": (percentile(&lists, 0.99) * 10.0).round() / 10.0,
        "store_mb": store_bytes.map(|b| (b as f64 / 1048576.0 * 10.0).round() / 10.0),
    });
    jobhook::outln!(
        "jobhook-bench: {} jobs, {} concurrent, {} Pending polls each, poll interval {}, {store}, {} instance(s), \
         no upstream rate cap, 256 callbacks in flight per host",
        args.jobs,
        args.concurrency,
        args.pending_polls,
        args.poll_interval,
        args.instances
    );
    jobhook::outln!();
    jobhook::outln!("| figure | value |");
    jobhook::outln!("| --- | --- |");
    let row = |name: &str, value: String| jobhook::outln!("| {name} | {value} |");
    row("machine limit (benchmark's own 3 exchanges per job)", format!("{limit:.0} jobs/s"));
    row(
        "end to end (first registration → last callback)",
        format!("{jobs_per_s:.0} jobs/s ({:.2} × limit)", jobs_per_s / limit),
    );
    row("registrations", format!("{:.0}/s", args.jobs as f64 / registration_secs));
    row(
        "registration latency p50 / p99",
        format!("{:.1} / {:.1} ms", percentile(&latencies, 0.5), percentile(&latencies, 0.99)),
    );
    row(
        "delivery lag after the terminal poll p50 / p99",
        format!("{:.1} / {:.1} ms", percentile(&lags, 0.5), percentile(&lags, 0.99)),
    );
    for (name, metric) in [
        ("jobhook's store write (queue + commit) p50 / p99", "jobhook_store_write_duration_seconds"),
        ("jobhook's delivery lag (due → first attempt done) p50 / p99", "jobhook_delivery_lag_seconds"),
    ] {
        let (p50, p99) = (histogram_quantile(&metrics, metric, 0.5), histogram_quantile(&metrics, metric, 0.99));
        row(name, format!("≤ {} / ≤ {} ms (histogram buckets)", bucket_ms(p50), bucket_ms(p99)));
    }
    let sample =
        |name: &str| metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok());
    if let (Some(busy), Some(writes)) =
        (sample("jobhook_store_writer_busy_seconds_total"), sample("jobhook_store_write_duration_seconds_count"))
    {
        row(
            "jobhook's store writer busy / time per write",
            format!("{:.0}% of the run / {:.0} µs", busy / elapsed * 100.0, busy / writes.max(1.0) * 1e6),
        );
    }
    row("polls per job", format!("{:.2} (ideal {})", polls / args.jobs as f64, args.pending_polls + 1));
    row("jobhook CPU per 1,000 jobs (all instances)", format!("{:.3} s", cpu / args.jobs as f64 * 1000.0));
    if let Some(pg_cpu) = pg_cpu {
        row(
            "PostgreSQL CPU per 1,000 jobs (the backends serving jobhook)",
            format!("{:.3} s", pg_cpu / args.jobs as f64 * 1000.0),
        );
    }
    row("jobhook peak RSS (largest instance)", format!("{:.1} MB", peak_rss as f64 / 1048576.0));
    row(
        "store transactions per job",
        transactions.map(|t| format!("{:.3}", t as f64 / args.jobs as f64)).unwrap_or_else(|| "unknown".into()),
    );
    row(
        &format!("GET /metrics with {} stored subscriptions: p50 / max of 20", args.history + delivered),
        format!("{:.1} / {:.1} ms", percentile(&scrape, 0.5), scrape.last().copied().unwrap_or(0.0)),
    );
    row(
        "GET /v1/subscriptions (?state=failed, ?job_id=, ?state=delivered; 50 each) p50 / p99",
        format!("{:.1} / {:.1} ms", percentile(&lists, 0.5), percentile(&lists, 0.99)),
    );
    if let Some(purged) = sample("jobhook_purged_subscriptions_total") {
        row("subscriptions purged by housekeeping during the run", format!("{purged:.0}"));
    }
    row(
        "store size on disk after the run",
        store_bytes.map(|b| format!("{:.1} MB", b as f64 / 1048576.0)).unwrap_or_else(|| "unknown".into()),
    );
    row("delivered / lost / duplicates", format!("{delivered} / {} / {duplicates}", args.jobs - delivered));
    row(
        "bad signatures / failed registrations",
        format!("{} / {}", receiver.bad_signatures.load(Ordering::Relaxed), failures.load(Ordering::Relaxed)),
    );
    if args.json {
        jobhook::outln!();
        jobhook::outln!("{}", serde_json::to_string_pretty(&results)?);
    }
    if delivered < args.jobs || receiver.bad_signatures.load(Ordering::Relaxed) > 0 {
        anyhow::bail!(
            "not a clean run: {} lost, {} bad signatures",
            args.jobs - delivered,
            receiver.bad_signatures.load(Ordering::Relaxed)
        );
    }
    Ok(())
}
