//! What /proc says about a process: CPU time and memory, jobhook's and the PostgreSQL server's.

/// A memory figure of a process from /proc/PID/status (`VmRSS`, `VmHWM`), in bytes.
pub(super) fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Current resident memory of a process (bytes).
pub(super) fn rss(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS")
}

/// jobhook's CPU seconds (user + system) and peak resident memory (bytes), from /proc.
pub(super) fn process_usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // After the ")": state is field 0, utime 11, stime 12 (clock ticks of 1/100 s on Linux).
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    (cpu, status_bytes(pid, "VmHWM"))
}

/// CPU seconds (user + system) of the PostgreSQL backends serving jobhook, by PID: those whose
/// `application_name` is this run's (the benchmark sets it in jobhook's database URL), so other clients
/// of a shared server are not counted. The server's shared helpers (WAL writer, checkpointer) are not
/// counted either. Read from /proc, which shows other users' processes' times; a backend that ends
/// during the run takes its time with it, so the figure is a floor (jobhook's pool keeps its
/// connections for the whole run).
pub(super) async fn postgres_cpu(base: &str, application: &str) -> std::collections::HashMap<u32, f64> {
    let pids: Vec<i32> = match <sqlx::PgConnection as sqlx::Connection>::connect(base).await {
        Ok(mut conn) => sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = $1")
            .bind(application)
            .fetch_all(&mut conn)
            .await
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    pids.into_iter().filter_map(|pid| u32::try_from(pid).ok()).map(|pid| (pid, process_usage(pid).0)).collect()
}

/// The backends' CPU seconds between two [`postgres_cpu`] readings (a backend new since counts from 0).
pub(super) fn postgres_cpu_since(
    before: &std::collections::HashMap<u32, f64>,
    after: std::collections::HashMap<u32, f64>,
) -> f64 {
    after.into_iter().map(|(pid, cpu)| cpu - before.get(&pid).copied().unwrap_or(0.0)).sum()
}
