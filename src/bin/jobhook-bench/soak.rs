//! `--soak D --rate R`: steady traffic, R jobs a second for D, against a store whose retention is on
//! (set `JOBHOOK_RETENTION` and `JOBHOOK_HOUSEKEEPING_SCHEDULE` in the environment; they pass through to
//! jobhook). Every 30 s it prints the store's size on disk, jobhook's RSS, the registrations' p99 in that
//! window and what housekeeping has purged so far; at the end, how much size and RSS moved after the first
//! third of the run, and whether every acknowledged job was delivered. With `--history N --history-age A`
//! (A beyond the retention) the store starts with N old subscriptions, so the first windows show
//! registrations while housekeeping purges them.

use super::*;

/// One 30-second window's figures.
struct Sample {
    at: Duration,
    store_bytes: u64,
    rss: u64,
}

pub(super) async fn soak_mode(args: &Args, binary: &std::path::Path, duration: Duration) -> anyhow::Result<()> {
    anyhow::ensure!(args.rate > 0, "--soak needs --rate above 0 (jobs per second)");
    let (_, upstream_addr) = Upstream::start(args.pending_polls, None).await;
    let receiver = Receiver::new()?;
    let receiver_addr = serve(axum::Router::new().route("/hook", post(callback)).with_state(receiver.clone())).await;
    let dir = std::env::temp_dir().join(format!("jobhook-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let (db_url, schema) = fresh_store(&dir, args.database_url.as_deref()).await?;
    history::prepare(&db_url, args).await?;
    let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut jobhook = start_jobhook(binary, &db_url, listen, upstream_addr, &args.poll_interval).await?;
    let http = reqwest::Client::builder().pool_max_idle_per_host(args.concurrency).build()?;
    let callback_url = format!("http://{receiver_addr}/hook");
    jobhook::outln!(
        "jobhook-bench soak: {} jobs/s for {}, {} Pending polls each, {}; retention {}, housekeeping {}",
        args.rate,
        humantime::format_duration(duration),
        args.pending_polls,
        if args.database_url.is_some() { "PostgreSQL" } else { "SQLite" },
        std::env::var("JOBHOOK_RETENTION").unwrap_or_else(|_| "default (30d)".into()),
        std::env::var("JOBHOOK_HOUSEKEEPING_SCHEDULE").unwrap_or_else(|_| "default".into()),
    );
    jobhook::outln!(
        "| at | store on disk | jobhook RSS | registered (acknowledged) | delivered | registration p99 in window | purged |"
    );
    jobhook::outln!("| --- | --- | --- | --- | --- | --- | --- |");

    // Registrations at a steady rate: a tick every 10 ms sends its share, each in a task of its own, at
    // most --concurrency in flight (a registration that waits longer shows in the p99, not in the rate).
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let window: Arc<Mutex<Vec<f64>>> = Arc::default();
    let slots = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_millis(10));
    let (mut sent, mut skipped) = (0u64, 0u64);
    let mut samples = Vec::new();
    let mut next_sample = Duration::from_secs(30);
    while started.elapsed() < duration {
        ticks.tick().await;
        let due = (started.elapsed().as_secs_f64() * args.rate as f64) as u64;
        while sent < due {
            sent += 1;
            // Every client busy: this job is not sent (counted), rather than sent late in a burst.
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                skipped += 1;
                continue;
            };
            let (http, callback_url, acked, window) =
                (http.clone(), callback_url.clone(), acked.clone(), window.clone());
            tokio::spawn(async move {
                let job = uuid::Uuid::new_v4().to_string();
                let at = Instant::now();
                if register_one(&http, listen, &job, &callback_url).await {
                    window.lock().unwrap().push(at.elapsed().as_secs_f64() * 1000.0);
                    acked.lock().unwrap().push(job);
                }
                drop(slot);
            });
        }
        if started.elapsed() >= next_sample {
            next_sample += Duration::from_secs(30);
            let mut latencies = std::mem::take(&mut *window.lock().unwrap());
            latencies.sort_by(f64::total_cmp);
            let p99 = latencies.get(latencies.len() * 99 / 100).copied().unwrap_or(0.0);
            let metrics = match http.get(format!("http://{listen}/metrics")).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            let purged = metric_value(&metrics, "jobhook_purged_subscriptions_total");
            let sample = Sample {
                at: started.elapsed(),
                store_bytes: history::store_bytes(&db_url).await.unwrap_or(0),
                rss: rss(jobhook.pid),
            };
            jobhook::outln!(
                "| {:.0} s | {:.1} MB | {:.1} MB | {} | {} | {:.1} ms | {:.0} |",
                sample.at.as_secs_f64(),
                sample.store_bytes as f64 / 1e6,
                sample.rss as f64 / 1e6,
                acked.lock().unwrap().len(),
                receiver.received.load(Ordering::Relaxed),
                p99,
                purged
            );
            samples.push(sample);
        }
    }
    // Every acknowledged job delivered?
    let acked: Vec<String> = acked.lock().unwrap().clone();
    let give_up = Instant::now() + Duration::from_secs(120);
    let lost = loop {
        let lost = {
            let seen = receiver.seen.lock().unwrap();
            acked.iter().filter(|job| !seen.contains_key(*job)).count()
        };
        if lost == 0 || Instant::now() > give_up {
            break lost;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let _ = jobhook.child.start_kill();
    drop_store(args.database_url.as_deref(), schema).await;
    let _ = std::fs::remove_dir_all(&dir);

    // Spread after the first third: (max - min) / mean.
    let settled: Vec<&Sample> = samples.iter().filter(|s| s.at >= duration / 3).collect();
    let spread = |f: fn(&Sample) -> u64| {
        let values: Vec<f64> = settled.iter().map(|s| f(s) as f64).collect();
        let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
        let (min, max) = values.iter().fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        if mean > 0.0 {
            format!("{:.1} – {:.1} MB (±{:.0} % of the mean)", min / 1e6, max / 1e6, (max - min) / 2.0 / mean * 100.0)
        } else {
            "?".into()
        }
    };
    jobhook::outln!();
    jobhook::outln!("after the first third of the run: store on disk {}", spread(|s| s.store_bytes));
    jobhook::outln!("after the first third of the run: jobhook RSS {}", spread(|s| s.rss));
    jobhook::outln!(
        "not sent (every client busy) {skipped} / acknowledged {} / delivered {} / lost {lost} / bad signatures {}",
        acked.len(),
        acked.len() - lost,
        receiver.bad_signatures.load(Ordering::Relaxed)
    );
    Ok(())
}
