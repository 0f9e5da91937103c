//! Retention: ended subscriptions are purged after `--retention`, with their attempts and orphaned
//! jobs; live ones never; the state gauges stay equal to a real count; list queries use indexes.

use std::sync::Arc;
use std::time::Duration;

use jobhook::domain::{FailureReason, JobId, JobStatus, SubscriptionId, Timestamp};
use jobhook::keys::{ApiKey, SigningSecret};
use jobhook::store::{AttemptRecord, AttemptResult, JobEnd, Purged, Registered, Registration, Store, TenantSub};
use reqwest::StatusCode;

use crate::support::helpers::*;

/// A store of its own (SQLite file or PostgreSQL schema), with one tenant; and its URL.
async fn store_with_key() -> (Arc<dyn Store>, ApiKey, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_db_url(dir.path()).await;
    let store = jobhook::store::open(&url).await.unwrap();
    let key = ApiKey::generate();
    store.create_key("test", key.hash(), &SigningSecret::generate(), at(0)).await.unwrap();
    (store, key, url, dir)
}

fn at(ms: i64) -> Timestamp {
    Timestamp::from_millis(ms)
}

/// A registration of `job` to `url` by the holder of `key`, at `now`.
fn registration(key: &ApiKey, id: SubscriptionId, job: JobId, url: &str, now: Timestamp) -> Registration {
    let callback_url = url.parse().unwrap();
    Registration { key: key.hash(), id, job_id: job, callback_url, form: Default::default(), now }
}

/// Registers a job at `at` and, if `ended_at` is given, ends it then: the job succeeds, and its
/// delivery is accepted at `ended_at`. Returns the subscription.
async fn subscription(store: &dyn Store, key: &ApiKey, registered: i64, ended: Option<i64>) -> SubscriptionId {
    let (registered, ended_at) = (at(registered), ended.map(at));
    let job: JobId = uuid::Uuid::new_v4().to_string().parse().unwrap();
    let id = SubscriptionId::new();
    let Registered::CreatedPolling(..) =
        store.register(registration(key, id, job.clone(), "https://receiver.example/hook", registered)).await.unwrap()
    else {
        panic!("a new job is polled");
    };
    if let Some(ended_at) = ended_at {
        let body = bytes::Bytes::from(format!(r#"{{"job_id":"{job}","status":"Succeed","image_urls":[]}}"#));
        let tasks = store
            .complete_job(
                JobEnd { job_id: job, status: JobStatus::Succeed, body, now: registered + Duration::from_millis(1) },
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        let task = &tasks[0];
        let record = AttemptRecord {
            subscription_id: id,
            partition: task.partition,
            series: 1,
            attempt: 1,
            webhook_id: task.webhook_id.clone(),
            started_at: ended_at,
            status_code: Some(204),
            error: None,
            duration_ms: 1,
            response_content_type: None,
            response_body: Some(String::new()),
        };
        assert!(store.record_attempt(&record, AttemptResult::Delivered, ended_at).await.unwrap());
    }
    id
}

#[tokio::test]
async fn a_subscription_ended_before_the_cutoff_is_purged_one_ended_at_it_or_after_is_kept_live_ones_never() {
    let (store, key, _url, _dir) = store_with_key().await;
    let tenant = store.tenant_by_key(key.hash()).await.unwrap().unwrap().id;
    let of = |id| TenantSub { tenant_id: tenant, id };
    let outside = subscription(store.as_ref(), &key, 1_000, Some(9_999)).await;
    let at_cutoff = subscription(store.as_ref(), &key, 1_000, Some(10_000)).await;
    let inside = subscription(store.as_ref(), &key, 1_000, Some(10_001)).await;
    // Live, and far older than the cutoff: never purged, whatever its age.
    let live = subscription(store.as_ref(), &key, 0, None).await;

    let would = store.purgeable(at(10_000)).await.unwrap();
    assert_eq!(would, Purged { subscriptions: 1, attempts: 1, jobs: 1 });
    let purged = jobhook::housekeeping::purge(store.as_ref(), at(10_000), |_| {}).await.unwrap().unwrap();
    assert_eq!(purged, would, "the dry run counts what the purge deletes");
    assert!(store.subscription(of(outside)).await.unwrap().is_none(), "ended before the cutoff");
    assert!(store.attempts(of(outside)).await.unwrap().is_none());
    for kept in [at_cutoff, inside, live] {
        assert!(store.subscription(of(kept)).await.unwrap().is_some(), "{kept} was purged");
    }
    assert_eq!(store.attempts(of(inside)).await.unwrap().unwrap().len(), 1);
    // Again: nothing more to do.
    assert_eq!(
        jobhook::housekeeping::purge(store.as_ref(), at(10_000), |_| {}).await.unwrap().unwrap(),
        Purged::default()
    );
}

#[tokio::test]
async fn a_job_row_goes_only_with_its_last_subscription() {
    let (store, key, _url, _dir) = store_with_key().await;
    let tenant = store.tenant_by_key(key.hash()).await.unwrap().unwrap().id;
    let of = |id| TenantSub { tenant_id: tenant, id };
    // Two subscriptions of one job: one fails early, the other is still polling.
    let job: JobId = uuid::Uuid::new_v4().to_string().parse().unwrap();
    let (a, b) = (SubscriptionId::new(), SubscriptionId::new());
    store.register(registration(&key, a, job.clone(), "https://a.example/", at(100))).await.unwrap();
    store.fail_job(job.clone(), FailureReason::UpstreamJobNotFound, "gone", at(200)).await.unwrap();
    store.register(registration(&key, b, job.clone(), "https://b.example/", at(300))).await.unwrap();
    let purged = jobhook::housekeeping::purge(store.as_ref(), at(10_000), |_| {}).await.unwrap().unwrap();
    assert_eq!(purged, Purged { subscriptions: 1, attempts: 0, jobs: 0 });
    assert!(store.subscription(of(b)).await.unwrap().is_some());
    assert!(store.pollable_job(job).await.unwrap().is_some(), "the job of a live subscription stays");
}

/// The whole loop with a short retention: delivered subscriptions disappear (404), metrics count the
/// purge, the state gauges follow, and live work registered meanwhile is untouched.
#[tokio::test]
async fn housekeeping_purges_on_its_schedule_while_work_goes_on() {
    let app =
        spawn_app_with(Settings::default().arg("--retention", "1s").arg("--housekeeping-schedule", "*/1 * * * * *"))
            .await;
    let mut ended = Vec::new();
    for _ in 0..30 {
        ended.push(app.register(&new_job(), &app.receiver.url("/hook")).await["id"].as_str().unwrap().to_owned());
    }
    // Delivered, as the receiver saw it: asking each subscription's state would race its purge (a
    // second after delivery), which a busy machine can let pass before the question.
    eventually(Duration::from_secs(30), "30 deliveries", || async {
        (app.receiver.requests_to("/hook").len() >= 30).then_some(())
    })
    .await;
    // Live work while the purge runs: jobs that never end.
    let pending_job = new_job();
    app.upstream.script(pending_job.parse().unwrap(), vec![jobhook::mock_upstream::Answer::Pending; 10_000]);
    let live = app.register(&pending_job, &app.receiver.url("/live")).await;
    let live = live["id"].as_str().unwrap();
    eventually(Duration::from_secs(15), "the ended subscriptions to be purged", || async {
        let mut gone = true;
        for id in &ended {
            gone &= app.get_as(KEY_A, &format!("/v1/subscriptions/{id}")).await.status() == StatusCode::NOT_FOUND;
        }
        gone.then_some(())
    })
    .await;
    assert_eq!(app.subscription(live).await["state"], "polling");
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("jobhook_purged_subscriptions_total 30"), "{metrics}");
    assert!(metrics.contains("jobhook_purged_attempts_total 30"), "{metrics}");
    assert!(metrics.contains("jobhook_purged_jobs_total 30"), "{metrics}");
}

/// The state gauges are counts kept with every change, not counts of the table: they must still equal
/// a real count after kill -9 (twice, mid-flow), cancellations, and a purge run from the command line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_gauges_equal_a_real_count_after_kill_9_and_a_purge() {
    use crate::support::binary::{args_on, free_port, register_all, start};
    const JOBS: usize = 400;
    let upstream = jobhook::mock_upstream::MockUpstream::start(&mock_args(2)).await.unwrap();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db_url = fresh_db_url(dir.path()).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let args = args_on(&listen, &db_url, &upstream.url());
    let mut running = start(&args).await;
    let jobs: Vec<String> = (0..JOBS).map(|_| new_job()).collect();
    let registering = register_all(jobs, vec![listen.clone()], receiver.url("/hook"));
    for target in [JOBS / 4, JOBS / 2] {
        eventually(Duration::from_secs(60), "deliveries before a crash", || async {
            (receiver.requests_to("/hook").len() >= target).then_some(())
        })
        .await;
        running.child.start_kill().unwrap();
        running.child.wait().await.unwrap();
        running = start(&args).await;
    }
    assert_eq!(registering.await.unwrap().len(), JOBS);
    let http = reqwest::Client::new();
    let app = format!("http://{listen}");
    // Some live ones, and some cancelled.
    for i in 0..10 {
        let job = new_job();
        upstream.script(job.parse().unwrap(), vec![jobhook::mock_upstream::Answer::Pending; 10_000]);
        let sub: serde_json::Value = http
            .post(format!("{app}/v1/subscriptions"))
            .bearer_auth(KEY_A)
            .json(&serde_json::json!({"job_id": job, "callback_url": receiver.url("/live")}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if i % 2 == 0 {
            let id = sub["id"].as_str().unwrap();
            let deleted = http.delete(format!("{app}/v1/subscriptions/{id}")).bearer_auth(KEY_A).send().await.unwrap();
            assert_eq!(deleted.status(), 204);
        }
    }
    let gauges_match = || async {
        let real = real_counts(&db_url).await;
        let text = http.get(format!("{app}/metrics")).send().await.ok()?.text().await.ok()?;
        let gauges = gauges(&text);
        (gauges == real).then_some(real)
    };
    // Once every job is delivered (some may still be on their way after the restarts).
    let real =
        eventually(Duration::from_secs(60), "every job delivered and the gauges equal to a real count", || async {
            let real = gauges_match().await?;
            (real.get("delivered").copied().unwrap_or(0) as usize == JOBS).then_some(real)
        })
        .await;
    assert_eq!(real.get("cancelled").copied().unwrap_or(0), 5, "{real:?}");
    assert_eq!(loose_references(&db_url).await, (0, 0), "subscriptions off their job, jobs with no subscription");

    // A purge from the command line while the service runs: the ended ones go, the gauges follow.
    let purge = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args(["purge", "--older-than", "0s", "--database-url", &db_url])
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&purge.stdout);
    assert!(purge.status.success(), "{said} {}", String::from_utf8_lossy(&purge.stderr));
    assert!(said.contains(&format!("deleted {} subscription(s)", JOBS + 5)), "{said}");
    let real =
        eventually(Duration::from_secs(30), "the gauges to equal a real count after the purge", gauges_match).await;
    assert_eq!(real.get("polling").copied(), Some(5), "{real:?}");
    assert_eq!(real.values().sum::<i64>(), 5, "{real:?}");
    assert_eq!(loose_references(&db_url).await, (0, 0), "subscriptions off their job, jobs with no subscription");
    running.child.start_kill().unwrap();
}

/// Subscriptions whose job row is missing (on SQLite also: whose `job_created_at` is not their job's
/// creation time, by which SQLite finds them; no foreign key keeps either there, see its migration
/// 0011), and job rows no subscription refers to.
async fn loose_references(db_url: &str) -> (i64, i64) {
    let jobs_without =
        "SELECT COUNT(*) FROM jobs j WHERE NOT EXISTS (SELECT 1 FROM subscriptions s WHERE s.job_id = j.job_id)";
    if on_postgres() {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(db_url).await.unwrap();
        let off: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM subscriptions s WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.job_id = s.job_id)",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        (off, sqlx::query_scalar(jobs_without).fetch_one(&mut conn).await.unwrap())
    } else {
        let conn = rusqlite::Connection::open(jobhook::store::sqlite_file(db_url).unwrap()).unwrap();
        let off: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM subscriptions s WHERE NOT EXISTS \
                 (SELECT 1 FROM jobs j WHERE j.job_id = s.job_id AND j.created_at = s.job_created_at)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        (off, conn.query_row(jobs_without, [], |r| r.get(0)).unwrap())
    }
}

/// `jobhook_subscriptions{state="…"} n` from a scrape.
fn gauges(metrics: &str) -> std::collections::BTreeMap<String, i64> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("jobhook_subscriptions{state=\""))
        .filter_map(|rest| {
            let (state, n) = rest.split_once("\"} ")?;
            Some((state.to_owned(), n.trim().parse().ok()?))
        })
        .filter(|(_, n)| *n != 0)
        .collect()
}

/// Subscriptions by state, counted in the store itself.
async fn real_counts(db_url: &str) -> std::collections::BTreeMap<String, i64> {
    let rows: Vec<(String, i64)> = if on_postgres() {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(db_url).await.unwrap();
        sqlx::query_as("SELECT state, COUNT(*) FROM subscriptions GROUP BY state").fetch_all(&mut conn).await.unwrap()
    } else {
        let conn = rusqlite::Connection::open(jobhook::store::sqlite_file(db_url).unwrap()).unwrap();
        let mut statement = conn.prepare("SELECT state, COUNT(*) FROM subscriptions GROUP BY state").unwrap();
        statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
    };
    rows.into_iter().filter(|(_, n)| *n != 0).collect()
}

/// Every shape of `GET /v1/subscriptions` (no filter, `job_id`, `state`, a cursor, and their mixes) is
/// served by an index: the plan the database itself makes never scans the subscriptions table (nor the
/// delivery log, read for each row's last delivery error).
#[tokio::test]
async fn every_list_query_is_served_by_an_index() {
    use jobhook::domain::SubscriptionState;
    use jobhook::store::ListFilter;
    let (store, key, url, _dir) = store_with_key().await;
    for i in 0..20 {
        subscription(store.as_ref(), &key, i, (i % 2 == 0).then_some(i + 5)).await;
    }
    let job: JobId = uuid::Uuid::new_v4().to_string().parse().unwrap();
    let mut shapes = Vec::new();
    for job_id in [None, Some(job)] {
        for state in [None, Some(SubscriptionState::Failed)] {
            for before in [None, Some(SubscriptionId::new())] {
                shapes.push(ListFilter { job_id: job_id.clone(), state, before, limit: 50 });
            }
        }
    }
    for filter in &shapes {
        let sql = jobhook::store::list_statement(&url, filter);
        let values: Vec<String> = [
            filter.job_id.as_ref().map(|j| j.to_string()),
            filter.state.map(|s| s.as_str().to_owned()),
            filter.before.map(|b| b.to_string()),
        ]
        .into_iter()
        .flatten()
        .collect();
        let plan = explain(&url, &sql, &values).await;
        let scans: Vec<&String> = plan
            .iter()
            .filter(|line| {
                if on_postgres() {
                    line.contains("Seq Scan on subscriptions") || line.contains("Seq Scan on delivery_attempts")
                } else {
                    // SQLite: "SCAN s" (a table scan) or "SCAN s USING INDEX …" (a whole index).
                    line.contains("SCAN s") || line.contains("SCAN a")
                }
            })
            .collect();
        assert!(scans.is_empty(), "{filter:?}: a full scan in the plan of\n{sql}\n{plan:#?}");
        // A job's few subscriptions are found by the job, not among all of the tenant's.
        if filter.job_id.is_some() && !on_postgres() {
            assert!(plan.iter().any(|l| l.starts_with("SEARCH s") && l.contains("job_id=?")), "{filter:?}: {plan:#?}");
        }
    }
}

/// The plan of `sql` with `values` after the tenant (1) and before the limit (50), in the store at `url`.
async fn explain(url: &str, sql: &str, values: &[String]) -> Vec<String> {
    if on_postgres() {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(url).await.unwrap();
        // Tables this small are cheaper to scan: forbid it, so a scan in the plan means no index fits.
        sqlx::query("SET enable_seqscan = off").execute(&mut conn).await.unwrap();
        let mut query = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}"))).bind(1_i64);
        for v in values {
            query = query.bind(v);
        }
        query.bind(50_i64).fetch_all(&mut conn).await.unwrap()
    } else {
        let conn = rusqlite::Connection::open(jobhook::store::sqlite_file(url).unwrap()).unwrap();
        let mut statement = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let binds: Vec<rusqlite::types::Value> = std::iter::once(rusqlite::types::Value::Integer(1))
            .chain(values.iter().cloned().map(rusqlite::types::Value::Text))
            .chain(std::iter::once(rusqlite::types::Value::Integer(50)))
            .collect();
        statement
            .query_map(rusqlite::params_from_iter(binds), |r| r.get::<_, String>(3))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }
}

/// SQLite finds a job's subscriptions by the job's creation time first (migration 0011). A row that
/// an older jobhook inserts on the same file (after a downgrade) carries no creation time; the store
/// fills it in, so the job still finds that subscription and the job's end reaches it.
#[tokio::test]
async fn a_subscription_inserted_by_an_older_jobhook_is_still_found_by_its_job() {
    if on_postgres() {
        return; // PostgreSQL's subscriptions are found by job ID alone
    }
    use jobhook::store::ListFilter;
    let (store, key, url, _dir) = store_with_key().await;
    let job: JobId = uuid::Uuid::new_v4().to_string().parse().unwrap();
    let first = SubscriptionId::new();
    let registered = store.register(registration(&key, first, job.clone(), "https://a.example/hook", at(1_000)));
    assert!(matches!(registered.await.unwrap(), Registered::CreatedPolling(..)));
    // What an older jobhook's registration writes: every column it knows, not job_created_at.
    let older = SubscriptionId::new();
    let conn = rusqlite::Connection::open(jobhook::store::sqlite_file(&url).unwrap()).unwrap();
    conn.execute(
        "INSERT INTO subscriptions (id, tenant_id, job_id, callback_url, state, created_at, updated_at, partition) \
         SELECT ?1, tenant_id, job_id, 'https://b.example/hook', 'polling', 2000, 2000, partition FROM subscriptions",
        [older.to_string()],
    )
    .unwrap();
    drop(conn);
    let tenant = store.tenant_by_key(key.hash()).await.unwrap().unwrap().id;
    let filter = ListFilter { job_id: Some(job.clone()), state: None, before: None, limit: 50 };
    let mut listed: Vec<SubscriptionId> =
        store.list_subscriptions(tenant, &filter).await.unwrap().into_iter().map(|s| s.id).collect();
    listed.sort();
    assert_eq!(listed, vec![first, older]);
    let body = bytes::Bytes::from(format!(r#"{{"job_id":"{job}","status":"Succeed","image_urls":[]}}"#));
    let end = JobEnd { job_id: job, status: JobStatus::Succeed, body, now: at(3_000) };
    let tasks = store.complete_job(end, Duration::from_secs(30)).await.unwrap();
    let mut delivered: Vec<SubscriptionId> = tasks.iter().map(|t| t.subscription_id).collect();
    delivered.sort();
    assert_eq!(delivered, vec![first, older]);
}

/// A bulk redelivery (`POST /v1/subscriptions/redeliver`) skips a subscription that a newer one of the
/// same job and callback has replaced; on SQLite that check must find the job's subscriptions through
/// the job's index (keyed by the job's creation time first, migration 0011), not walk the tenant's live
/// and delivered ones, of which a long past holds millions. (PostgreSQL's job index is led by job_id,
/// which any spelling of the condition uses.)
#[tokio::test]
async fn a_bulk_redelivery_checks_for_a_newer_subscription_through_the_jobs_index() {
    if on_postgres() {
        return;
    }
    use jobhook::store::BulkFilter;
    use rusqlite::types::Value;
    let (store, key, url, _dir) = store_with_key().await;
    for i in 0..20 {
        subscription(store.as_ref(), &key, i, Some(i + 5)).await;
    }
    for host in [None, Some("receiver.example".to_owned())] {
        let filter = BulkFilter {
            state: jobhook::domain::SubscriptionState::Delivered,
            since: at(0),
            until: at(1_000),
            callback_host: host.clone(),
            limit: 100,
        };
        let sql = jobhook::store::bulk_statement(&url, &filter);
        let conn = rusqlite::Connection::open(jobhook::store::sqlite_file(&url).unwrap()).unwrap();
        let mut binds =
            vec![Value::Integer(1), Value::Text("delivered".into()), Value::Integer(0), Value::Integer(1_000)];
        binds.extend(host.iter().flat_map(|_| (0..4).map(|_| Value::Text("https://receiver.example/%".into()))));
        binds.push(Value::Integer(101));
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map(rusqlite::params_from_iter(binds), |r| r.get::<_, String>(3))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(
            plan.iter().any(|l| l.starts_with("SEARCH o") && l.contains("job_created_at=? AND job_id=?")),
            "{sql}\n{plan:#?}"
        );
        assert!(!plan.iter().any(|l| l.contains("SCAN s") || l.contains("SCAN o")), "{sql}\n{plan:#?}");
    }
}
