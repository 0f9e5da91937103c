//! The figures: quantiles from jobhook's own /metrics, and the table printed at the end.

use super::*;

/// The upper bound of the histogram bucket holding quantile `q` (Prometheus text, cumulative buckets).
pub(crate) fn histogram_quantile(text: &str, metric: &str, q: f64) -> Option<f64> {
    let prefix = format!("{metric}_bucket{{le=\"");
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.last()?.1;
    buckets.iter().find(|(_, c)| *c >= q * total).map(|(le, _)| *le)
}

pub(crate) fn bucket_ms(bound: Option<f64>) -> String {
    match bound {
        Some(b) if b.is_finite() => format!("{:.0}", b * 1000.0),
        Some(_) => "∞".into(),
        None => "?".into(),
    }
}

/// The run's figures, computed once for the table and the JSON.
struct Figures {
    delivered: usize,
    lost: usize,
    duplicates: u64,
    split_ids: usize,
    /// Delivery lags after the terminal poll (ms), sorted.
    lags: Vec<f64>,
    jobs_per_s: f64,
    polls: f64,
    bad_signatures: u64,
    store: &'static str,
}

fn figures(args: &Args, upstream: &Upstream, receiver: &Receiver, pushed: &Pushed) -> Figures {
    let seen = &pushed.seen;
    let delivered = pushed.jobs.iter().filter(|j| seen.contains_key(*j)).count();
    let mut lags = Vec::with_capacity(seen.len());
    for (job, s) in seen {
        let Ok(id) = uuid::Uuid::try_parse(job) else { continue };
        let terminal = upstream.shard(&id).lock().unwrap().get(&id).and_then(|e| e.terminal_at);
        if let (Some(terminal), Some(first)) = (terminal, s.first_at) {
            lags.push(first.saturating_duration_since(terminal).as_secs_f64() * 1000.0);
        }
    }
    lags.sort_by(f64::total_cmp);
    Figures {
        delivered,
        lost: args.jobs - delivered,
        duplicates: seen.values().map(|s| u64::from(s.count.saturating_sub(1))).sum(),
        split_ids: seen.values().filter(|s| s.webhook_ids.len() > 1).count(),
        lags,
        jobs_per_s: delivered as f64 / pushed.elapsed,
        polls: upstream.polls.load(Ordering::Relaxed) as f64,
        bad_signatures: receiver.bad_signatures.load(Ordering::Relaxed),
        store: if args.database_url.is_some() { "PostgreSQL" } else { "SQLite" },
    }
}

/// Prints the table (and the JSON with `--json`); fails a run that lost a job or saw a bad signature.
pub(crate) fn report(
    args: &Args,
    upstream: &Upstream,
    receiver: &Receiver,
    limit: f64,
    pushed: &Pushed,
    usage: &Usage,
) -> anyhow::Result<()> {
    let f = figures(args, upstream, receiver, pushed);
    print_table(args, limit, pushed, usage, &f);
    if args.json {
        jobhook::outln!();
        jobhook::outln!("{}", serde_json::to_string_pretty(&results(args, limit, pushed, usage, &f))?);
    }
    if f.lost > 0 || f.bad_signatures > 0 {
        anyhow::bail!("not a clean run: {} lost, {} bad signatures", f.lost, f.bad_signatures);
    }
    Ok(())
}

fn results(args: &Args, limit: f64, pushed: &Pushed, usage: &Usage, f: &Figures) -> serde_json::Value {
    let (latencies, jobs) = (&pushed.latencies, args.jobs as f64);
    json!({
        "jobs": args.jobs,
        "store": f.store,
        "instances": args.instances,
        "concurrency": args.concurrency,
        "pending_polls": args.pending_polls,
        "poll_interval": args.poll_interval,
        "limit_jobs_per_s": limit.round(),
        "jobs_per_s": f.jobs_per_s.round(),
        "ratio_to_limit": (f.jobs_per_s / limit * 100.0).round() / 100.0,
        "registrations_per_s": (jobs / pushed.registration_secs).round(),
        "registration_ms_p50": (percentile(latencies, 0.50) * 10.0).round() / 10.0,
        "registration_ms_p99": (percentile(latencies, 0.99) * 10.0).round() / 10.0,
        "delivery_lag_ms_p50": (percentile(&f.lags, 0.50) * 10.0).round() / 10.0,
        "delivery_lag_ms_p99": (percentile(&f.lags, 0.99) * 10.0).round() / 10.0,
        "polls_per_job": (f.polls / jobs * 100.0).round() / 100.0,
        "cpu_seconds_per_1000_jobs": (usage.cpu / jobs * 1000.0 * 1000.0).round() / 1000.0,
        "peak_rss_mb": (usage.peak_rss as f64 / 1048576.0 * 10.0).round() / 10.0,
        "store_transactions_per_job": usage.transactions.map(|t| (t as f64 / jobs * 1000.0).round() / 1000.0),
        "delivered": f.delivered,
        "lost": f.lost,
        "duplicates": f.duplicates,
        "jobs_under_several_webhook_ids": f.split_ids,
        "bad_signatures": f.bad_signatures,
        "failed_registrations": pushed.failures,
    })
}

fn print_table(args: &Args, limit: f64, pushed: &Pushed, usage: &Usage, f: &Figures) {
    let (latencies, jobs, metrics) = (&pushed.latencies, args.jobs as f64, &usage.metrics);
    jobhook::outln!(
        "jobhook-bench: {} jobs, {} concurrent, {} Pending polls each, poll interval {}, {}, {} instance(s), \
         no upstream rate cap, 256 callbacks in flight per host",
        args.jobs,
        args.concurrency,
        args.pending_polls,
        args.poll_interval,
        f.store,
        args.instances
    );
    jobhook::outln!();
    jobhook::outln!("| figure | value |");
    jobhook::outln!("| --- | --- |");
    let row = |name: &str, value: String| jobhook::outln!("| {name} | {value} |");
    row("machine limit (benchmark's own 3 exchanges per job)", format!("{limit:.0} jobs/s"));
    row(
        "end to end (first registration → last callback)",
        format!("{:.0} jobs/s ({:.2} × limit)", f.jobs_per_s, f.jobs_per_s / limit),
    );
    row("registrations", format!("{:.0}/s", jobs / pushed.registration_secs));
    row(
        "registration latency p50 / p99",
        format!("{:.1} / {:.1} ms", percentile(latencies, 0.5), percentile(latencies, 0.99)),
    );
    row(
        "delivery lag after the terminal poll p50 / p99",
        format!("{:.1} / {:.1} ms", percentile(&f.lags, 0.5), percentile(&f.lags, 0.99)),
    );
    for (name, metric) in [
        ("jobhook's store write (queue + commit) p50 / p99", "jobhook_store_write_duration_seconds"),
        ("jobhook's delivery lag (due → first attempt done) p50 / p99", "jobhook_delivery_lag_seconds"),
    ] {
        let (p50, p99) = (histogram_quantile(metrics, metric, 0.5), histogram_quantile(metrics, metric, 0.99));
        row(name, format!("≤ {} / ≤ {} ms (histogram buckets)", bucket_ms(p50), bucket_ms(p99)));
    }
    let sample =
        |name: &str| metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok());
    if let (Some(busy), Some(writes)) =
        (sample("jobhook_store_writer_busy_seconds_total"), sample("jobhook_store_write_duration_seconds_count"))
    {
        row(
            "jobhook's store writer busy / time per write",
            format!("{:.0}% of the run / {:.0} µs", busy / pushed.elapsed * 100.0, busy / writes.max(1.0) * 1e6),
        );
    }
    row("polls per job", format!("{:.2} (ideal {})", f.polls / jobs, args.pending_polls + 1));
    row("jobhook CPU per 1,000 jobs (all instances)", format!("{:.3} s", usage.cpu / jobs * 1000.0));
    row("jobhook peak RSS (largest instance)", format!("{:.1} MB", usage.peak_rss as f64 / 1048576.0));
    row(
        "store transactions per job",
        usage.transactions.map(|t| format!("{:.3}", t as f64 / jobs)).unwrap_or_else(|| "unknown".into()),
    );
    row("delivered / lost / duplicates", format!("{} / {} / {}", f.delivered, f.lost, f.duplicates));
    row("bad signatures / failed registrations", format!("{} / {}", f.bad_signatures, pushed.failures));
}
