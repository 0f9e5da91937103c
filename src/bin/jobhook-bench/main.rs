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

mod drive;
mod pending;
mod report;
mod sim;

use drive::*;
use pending::*;
use report::*;
use sim::*;

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
        return pending_mode(&args, &binary, n).await;
    }
    let upstream = Arc::new(Upstream {
        shards: (0..64).map(|_| Mutex::new(HashMap::new())).collect(),
        pending_polls: args.pending_polls,
        polls: AtomicU64::new(0),
        lateness: None,
    });
    let upstream_addr =
        serve(axum::Router::new().route("/public/v1/job/{id}", get(job_status)).with_state(upstream.clone())).await;
    let receiver = Arc::new(Receiver {
        secret: SECRET.parse().map_err(anyhow::Error::msg)?,
        seen: Mutex::new(HashMap::new()),
        bad_signatures: AtomicU64::new(0),
        received: AtomicU64::new(0),
    });
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
    let limit = measure_limit(&args, &http, receiver_addr, upstream_addr).await;
    // The limit run's polls are not jobhook's.
    upstream.polls.store(0, Ordering::Relaxed);
    // 2. jobhook on a fresh store.
    let cluster = start_cluster(&args, &binary, upstream_addr).await?;
    // 3. N jobs through jobhook.
    let pushed = push_jobs(&args, &http, &receiver, &cluster.listens, receiver_addr).await;
    let usage = stop_cluster(cluster, &http, &args).await;
    // 4. Figures.
    report(&args, &upstream, &receiver, limit, &pushed, &usage)
}

/// The rate at which the benchmark itself completes one job's three exchanges (registration-sized
/// POST, poll-sized GET, callback-sized POST) against its own servers: this machine's limit.
async fn measure_limit(
    args: &Args,
    http: &reqwest::Client,
    receiver_addr: SocketAddr,
    upstream_addr: SocketAddr,
) -> f64 {
    let limit_jobs = args.jobs.min(20_000);
    let limit_ids: Arc<Vec<String>> = Arc::new((0..limit_jobs).map(|_| uuid::Uuid::new_v4().to_string()).collect());
    let registration =
        format!(r#"{{"job_id":"{}","callback_url":"http://{receiver_addr}/hook"}}"#, uuid::Uuid::new_v4());
    let callback_body = format!(
        r#"{{"job_id":"{}","status":"Succeed","image_urls":["https://images.example.com/x/0.png"]}}"#,
        uuid::Uuid::new_v4()
    );
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
}

/// The `jobhook serve` processes under test, on one fresh store.
struct Cluster {
    instances: Vec<Jobhook>,
    listens: Arc<Vec<SocketAddr>>,
    dir: PathBuf,
    schema: Option<String>,
    cpu_before: f64,
}

async fn start_cluster(args: &Args, binary: &std::path::Path, upstream_addr: SocketAddr) -> anyhow::Result<Cluster> {
    let dir = std::env::temp_dir().join(format!("jobhook-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    anyhow::ensure!(
        args.instances >= 1 && (args.instances == 1 || args.database_url.is_some()),
        "--instances above 1 needs --database-url postgres://… (SQLite is one process's store)"
    );
    let (db_url, schema) = fresh_store(&dir, args.database_url.as_deref()).await?;
    let mut instances = Vec::new();
    let mut listens = Vec::new();
    for _ in 0..args.instances {
        let listen = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
            probe.local_addr()?
        };
        instances.push(start_jobhook(binary, &db_url, listen, upstream_addr, &args.poll_interval).await?);
        listens.push(listen);
    }
    if args.instances > 1 {
        // Let the instances see each other and share the partitions before the clock starts.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let cpu_before: f64 = instances.iter().map(|j| process_usage(j.pid).0).sum();
    Ok(Cluster { instances, listens: Arc::new(listens), dir, schema, cpu_before })
}

/// What pushing the jobs through showed.
struct Pushed {
    jobs: Arc<Vec<String>>,
    /// Registration latencies (ms), sorted.
    latencies: Vec<f64>,
    failures: u64,
    registration_secs: f64,
    /// From the first registration to the last first callback.
    elapsed: f64,
    seen: HashMap<String, Seen>,
}

/// Registers the jobs round-robin over the instances while watching the callbacks arrive; returns once
/// every job was called back, or after a minute without progress.
async fn push_jobs(
    args: &Args,
    http: &reqwest::Client,
    receiver: &Receiver,
    listens: &Arc<Vec<SocketAddr>>,
    receiver_addr: SocketAddr,
) -> Pushed {
    let jobs: Arc<Vec<String>> = Arc::new((0..args.jobs).map(|_| uuid::Uuid::new_v4().to_string()).collect());
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(args.jobs)));
    let failures = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let registering = {
        let (http, jobs, latencies, failures) = (http.clone(), jobs.clone(), latencies.clone(), failures.clone());
        let callback = format!("http://{receiver_addr}/hook");
        let listens = listens.clone();
        tokio::spawn(rate(args.jobs, args.concurrency, move |i| {
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
    let registered_in = watch_progress(args.jobs, receiver, start, &registering).await;
    let registration_secs = registered_in.unwrap_or_else(|| start.elapsed()).as_secs_f64();
    let seen = receiver.seen.lock().unwrap().clone();
    let last_callback = seen.values().filter_map(|s| s.first_at).max().unwrap_or_else(Instant::now);
    let mut latencies = latencies.lock().unwrap().clone();
    latencies.sort_by(f64::total_cmp);
    Pushed {
        jobs,
        latencies,
        failures: failures.load(Ordering::Relaxed),
        registration_secs,
        elapsed: last_callback.duration_since(start).as_secs_f64(),
        seen,
    }
}

/// A progress bar of the callbacks until all `jobs` arrived (or none for a minute); returns how long
/// the registrations took, if they finished.
async fn watch_progress(
    jobs: usize,
    receiver: &Receiver,
    start: Instant,
    registering: &tokio::task::JoinHandle<f64>,
) -> Option<Duration> {
    let bar = ProgressBar::new(jobs as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} delivered {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
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
        if got >= jobs {
            break;
        }
        if got != last_progress.0 {
            last_progress = (got, Instant::now());
        } else if last_progress.1.elapsed() > Duration::from_secs(60) {
            bar.println("no callback for 60 s: stopping");
            break;
        }
    }
    bar.finish_and_clear();
    registered_in
}

/// What jobhook reported and used.
struct Usage {
    /// jobhook's own /metrics at the end (the first instance).
    metrics: String,
    cpu: f64,
    peak_rss: u64,
    transactions: Option<u64>,
}

/// Reads jobhook's figures, stops it gracefully (so it reports its store transactions) and removes its
/// store.
async fn stop_cluster(cluster: Cluster, http: &reqwest::Client, args: &Args) -> Usage {
    let metrics = match http.get(format!("http://{}/metrics", cluster.listens[0])).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let usage: Vec<(f64, u64)> = cluster.instances.iter().map(|j| process_usage(j.pid)).collect();
    let cpu_after: f64 = usage.iter().map(|u| u.0).sum();
    let peak_rss = usage.iter().map(|u| u.1).max().unwrap_or(0);
    let mut transactions = Some(0u64);
    for Jobhook { mut child, pid, transactions: reported } in cluster.instances {
        let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let reported = *reported.lock().unwrap();
        transactions = transactions.zip(reported).map(|(a, b)| a + b);
    }
    let _ = std::fs::remove_dir_all(&cluster.dir);
    drop_store(args.database_url.as_deref(), cluster.schema).await;
    Usage { metrics, cpu: cpu_after - cluster.cpu_before, peak_rss, transactions }
}
