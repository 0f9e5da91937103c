//! `--pending N`: a million subscriptions that never end, and a restart under them.

use super::*;

/// Waits until every job in `jobs` was polled at or after `since`; returns when that happened.
pub(super) async fn all_polled_since(
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

/// `--pending N`: N subscriptions that never end, polled every `--pending-interval`.
pub(super) async fn pending_mode(args: &Args, binary: &std::path::Path, n: usize) -> anyhow::Result<()> {
    let interval = humantime::parse_duration(&args.pending_interval)?;
    let (upstream, upstream_addr) = Upstream::start(u32::MAX, Some(interval)).await;
    let dir = std::env::temp_dir().join(format!("jobhook-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let db = format!("sqlite://{}", dir.join("pending.db").display());
    let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut jobhook = start_jobhook(binary, &db, listen, upstream_addr, &args.pending_interval).await?;
    let base_rss = rss(jobhook.pid);
    let http = reqwest::Client::builder().pool_max_idle_per_host(args.concurrency).build()?;
    let jobs: Arc<Vec<String>> = Arc::new((0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect());
    let bar = ProgressBar::new_spinner();
    bar.set_message(format!("registering {n} pending jobs"));
    bar.enable_steady_tick(Duration::from_millis(200));
    let registrations =
        register_all(&http, listen, "http://127.0.0.1:9/never".into(), jobs.clone(), args.concurrency).await;
    // Steady state: every job polled since registration ended, then one more interval of samples.
    bar.set_message("waiting for every job to be polled");
    let registered = Instant::now();
    all_polled_since(&upstream, &jobs, registered, interval * 3).await;
    if let Some((_, samples)) = &upstream.lateness {
        samples.lock().unwrap().clear();
    }
    let window = Instant::now();
    let polls_before = upstream.polls.load(Ordering::Relaxed);
    let cpu_before = process_usage(jobhook.pid).0;
    tokio::time::sleep(interval + interval / 2).await;
    let polls = upstream.polls.load(Ordering::Relaxed) - polls_before;
    let polls_per_s = polls as f64 / window.elapsed().as_secs_f64();
    // What polling costs jobhook, steady state: nothing else runs in it during the window.
    let cpu_per_1000_polls = (process_usage(jobhook.pid).0 - cpu_before) / polls.max(1) as f64 * 1000.0;
    let mut late: Vec<f64> = upstream
        .lateness
        .as_ref()
        .map(|(_, s)| s.lock().unwrap().iter().map(|&v| f64::from(v)).collect())
        .unwrap_or_default();
    late.sort_by(f64::total_cmp);
    let held_rss = rss(jobhook.pid);
    // Restart: kill -9, start again, time until every job is polled again.
    bar.set_message("kill -9 and restart");
    let _ = jobhook.child.start_kill();
    let _ = jobhook.child.wait().await;
    let restarted = Instant::now();
    let mut again = start_jobhook(binary, &db, listen, upstream_addr, &args.pending_interval).await?;
    let listening_after = restarted.elapsed();
    let recovered = all_polled_since(&upstream, &jobs, restarted, interval * 4 + Duration::from_secs(60)).await;
    bar.finish_and_clear();
    let _ = again.child.start_kill();
    let _ = again.child.wait().await;
    let _ = std::fs::remove_dir_all(&dir);

    let per_sub = held_rss.saturating_sub(base_rss) as f64 / n as f64;
    let results = json!({
        "pending": n,
        "poll_interval": args.pending_interval,
        "registrations_per_s": registrations.round(),
        "rss_mb": (held_rss as f64 / 1048576.0 * 10.0).round() / 10.0,
        "rss_bytes_per_pending_subscription": per_sub.round(),
        "polls_per_s": polls_per_s.round(),
        "jobhook_cpu_s_per_1000_polls": (cpu_per_1000_polls * 1000.0).round() / 1000.0,
        "poll_lateness_ms_p50": (percentile(&late, 0.5) * 10.0).round() / 10.0,
        "poll_lateness_ms_p99": (percentile(&late, 0.99) * 10.0).round() / 10.0,
        "restart_listening_s": (listening_after.as_secs_f64() * 100.0).round() / 100.0,
        "restart_every_job_polled_again_s": recovered.map(|t| (t.duration_since(restarted).as_secs_f64() * 100.0).round() / 100.0),
    });
    jobhook::outln!("jobhook-bench --pending: {n} pending subscriptions, poll interval {}", args.pending_interval);
    jobhook::outln!();
    jobhook::outln!("| figure | value |");
    jobhook::outln!("| --- | --- |");
    jobhook::outln!("| registrations | {registrations:.0}/s |");
    jobhook::outln!(
        "| jobhook RSS holding them | {:.1} MB ({per_sub:.0} bytes per pending subscription) |",
        held_rss as f64 / 1048576.0
    );
    jobhook::outln!("| polls | {polls_per_s:.0}/s |");
    jobhook::outln!("| jobhook CPU per 1,000 polls | {cpu_per_1000_polls:.3} s |");
    jobhook::outln!(
        "| poll lateness (past interval + 10% jitter) p50 / p99 | {:.1} / {:.1} ms |",
        percentile(&late, 0.5),
        percentile(&late, 0.99)
    );
    jobhook::outln!("| kill -9, restart: listening again after | {:.2} s |", listening_after.as_secs_f64());
    match recovered {
        Some(t) => jobhook::outln!(
            "| kill -9, restart: every job polled again after | {:.2} s (first polls spread over one interval) |",
            t.duration_since(restarted).as_secs_f64()
        ),
        None => jobhook::outln!("| kill -9, restart: every job polled again after | not within the deadline |"),
    }
    if args.json {
        jobhook::outln!();
        jobhook::outln!("{}", serde_json::to_string_pretty(&results)?);
    }
    anyhow::ensure!(recovered.is_some(), "some pending jobs were not polled again after the restart");
    Ok(())
}
