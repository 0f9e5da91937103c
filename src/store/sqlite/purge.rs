//! The retention purge on SQLite: one short IMMEDIATE transaction per batch on the writer thread (the
//! group-committed writes queue behind it for a few milliseconds), then the freed pages handed back.

use rusqlite::{Connection, Transaction, params};

use super::*;

/// Ended states, as the partial index `subscriptions_ended` names them (the planner uses the index only
/// for this exact condition).
macro_rules! ended {
    () => {
        "state IN ('delivered', 'failed', 'expired', 'cancelled')"
    };
}

/// Pages one `incremental_vacuum` step frees: 1 MB at a time, so a registration queued behind a step
/// waits milliseconds (a step of 8 MB held the writer for hundreds of them).
const VACUUM_STEP_PAGES: i64 = 256;

/// How long one purge transaction may delete for. The writes that arrive meanwhile queue behind it, so
/// this is what the purge adds to a registration's latency: measured on a store of 3,000,000 rows, 200
/// rows at once held the writer ~90 ms and put registration p99 at 120-150 ms.
const PURGE_STEP_BUDGET: std::time::Duration = std::time::Duration::from_millis(8);

/// A purge step's statements: the oldest ended subscriptions, then for each its attempts, itself, and
/// its job unless another subscription still refers to it.
const PURGE_STATEMENTS: [&str; 4] = [
    concat!(
        "SELECT id, job_id FROM subscriptions WHERE ",
        ended!(),
        " AND updated_at < ?1 ORDER BY updated_at LIMIT ?2"
    ),
    "DELETE FROM delivery_attempts WHERE subscription_id = ?1",
    "DELETE FROM subscriptions WHERE id = ?1",
    "DELETE FROM jobs WHERE job_id = ?1 AND NOT EXISTS (SELECT 1 FROM subscriptions s \
     WHERE s.job_created_at = jobs.created_at AND s.job_id = ?1)",
];

pub(super) fn purge_batch(tx: &Transaction<'_>, ended_before: Timestamp, limit: u32) -> Result<Purged> {
    let [oldest, attempts, subscription, job] = PURGE_STATEMENTS;
    let rows: Vec<(String, String)> = tx
        .prepare_cached(oldest)
        .sq()?
        .query_map(params![ended_before, i64::from(limit)], |r| Ok((r.get(0)?, r.get(1)?)))
        .sq()?
        .collect::<rusqlite::Result<_>>()
        .sq()?;
    let mut purged = Purged::default();
    let mut attempts = tx.prepare_cached(attempts).sq()?;
    let mut subscription = tx.prepare_cached(subscription).sq()?;
    let mut job = tx.prepare_cached(job).sq()?;
    // Row by row until the budget is spent (at least one, so a run always gets through): a row of a
    // large store costs a few random B-tree pages, so `limit` rows can take far longer than a
    // registration should wait behind them.
    let started = std::time::Instant::now();
    let mut done = 0;
    for (id, job_id) in &rows {
        purged.attempts += attempts.execute(params![id]).sq()? as u64;
        purged.subscriptions += subscription.execute(params![id]).sq()? as u64;
        purged.jobs += job.execute(params![job_id]).sq()? as u64;
        done += 1;
        if started.elapsed() >= PURGE_STEP_BUDGET {
            break;
        }
    }
    tracing::trace!(rows = done, "purge step");
    Ok(purged)
}

pub(super) fn purgeable(c: &Connection, ended_before: Timestamp) -> Result<Purged> {
    let sql = concat!(
        "SELECT (SELECT COUNT(*) FROM subscriptions WHERE ",
        ended!(),
        " AND updated_at < ?1), (SELECT COUNT(*) FROM delivery_attempts a JOIN subscriptions s ON s.id = a.subscription_id WHERE s.",
        ended!(),
        " AND s.updated_at < ?1), (SELECT COUNT(DISTINCT s.job_id) FROM subscriptions s WHERE s.",
        ended!(),
        " AND s.updated_at < ?1 AND NOT EXISTS (SELECT 1 FROM subscriptions o WHERE o.job_created_at = s.job_created_at \
         AND o.job_id = s.job_id AND NOT (o.",
        ended!(),
        " AND o.updated_at < ?1)))"
    );
    let (subscriptions, attempts, jobs): (i64, i64, i64) =
        c.query_row(sql, params![ended_before], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).sq()?;
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok(Purged { subscriptions: n(subscriptions), attempts: n(attempts), jobs: n(jobs) })
}

/// Frees up to a step of the pages a purge left empty; whether some remain. (A store made before
/// auto_vacuum was set has none to free: SQLite reuses them instead.)
pub(super) fn vacuum_step(tx: &Transaction<'_>) -> Result<bool> {
    let incremental: i64 = tx.query_row("PRAGMA auto_vacuum", [], |r| r.get(0)).sq()?;
    // 2 = INCREMENTAL.
    if incremental != 2 {
        return Ok(false);
    }
    tx.execute_batch(&format!("PRAGMA incremental_vacuum({VACUUM_STEP_PAGES})")).sq()?;
    let free: i64 = tx.query_row("PRAGMA freelist_count", [], |r| r.get(0)).sq()?;
    Ok(free > 0)
}

#[cfg(test)]
mod tests {
    use rusqlite::{StatementStatus, TransactionBehavior};

    use super::*;

    /// A purge step finds and deletes through indexes only, the lookups SQLite makes to enforce foreign
    /// keys included (SQLite's own count of full-scan steps, per statement). A foreign key whose check
    /// found no index once made each purged job scan every subscription, which over a long past held
    /// the one writer for as long as that took.
    #[test]
    fn a_purge_step_scans_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("store.db")).unwrap();
        configure(&conn).unwrap();
        migrate::run(&mut conn).unwrap();
        conn.execute_batch(
            "INSERT INTO tenants (id, name, signing_secret, created_at) VALUES (1, 't', 'whsec_x', 0);
             CREATE TEMP TABLE n AS WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 400)
                 SELECT i FROM n;
             INSERT INTO jobs (job_id, partition, created_at, updated_at) SELECT 'job-' || i, 0, i, i FROM n;
             INSERT INTO subscriptions (id, tenant_id, job_id, partition, callback_url, state, created_at,
                 updated_at, job_created_at)
                 SELECT printf('sub-%04d', i), 1, 'job-' || i, 0, 'https://r.example/h', 'delivered', i, i, i FROM n;
             INSERT INTO delivery_attempts (subscription_id, series, attempt, webhook_id, started_at, status_code,
                 duration_ms) SELECT printf('sub-%04d', i), 1, 1, 'msg_x', i, 204, 1 FROM n;",
        )
        .unwrap();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).unwrap();
        let purged = purge_batch(&tx, Timestamp::from_millis(200), 50).unwrap();
        assert!(purged.subscriptions >= 1 && purged.jobs == purged.subscriptions, "{purged:?}");
        for sql in PURGE_STATEMENTS {
            let statement = tx.prepare_cached(sql).unwrap();
            assert_eq!(statement.get_status(StatementStatus::FullscanStep), 0, "a full scan in: {sql}");
        }
    }
}
