//! Several `jobhook serve` processes on one PostgreSQL database (the PostgreSQL pass only).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use jobhook::mock_upstream::MockUpstream;

use crate::support::binary::{Running, all_delivered, args_on, free_port, register_all, start};
use crate::support::blackhole::Blackhole;
use crate::support::helpers::*;

fn skip_on_sqlite() -> bool {
    if !on_postgres() {
        eprintln!("skipped on SQLite: several instances share a PostgreSQL database (run scripts/test.sh)");
    }
    !on_postgres()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_the_work_and_survive_losing_one() {
    if skip_on_sqlite() {
        return;
    }
    const JOBS: usize = 2_000;
    const PENDING: u64 = 3;
    let upstream = MockUpstream::start(&mock_args(PENDING as u32)).await.unwrap();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db_url = fresh_db_url(dir.path()).await;
    let listens: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let args = |listen: &str| {
        let mut args = args_on(listen, &db_url, &upstream.url());
        args.extend(["--lease-ttl".into(), "2s".into(), "--poll-interval".into(), "100ms".into()]);
        args
    };
    let mut instances: Vec<Running> = Vec::new();
    for listen in &listens {
        instances.push(start(&args(listen)).await);
    }

    let jobs: Vec<String> = (0..JOBS).map(|_| new_job()).collect();
    let registering = register_all(jobs, listens.clone(), receiver.url("/hook"));

    // Instance 0 dies mid-run; instance 1 is stopped and started again.
    eventually(Duration::from_secs(60), "a third of the deliveries", || async {
        (receiver.requests_to("/hook").len() >= JOBS / 3).then_some(())
    })
    .await;
    instances[0].child.start_kill().unwrap();
    instances[0].child.wait().await.unwrap();
    let killed_at = Instant::now();
    eventually(Duration::from_secs(60), "half of the deliveries", || async {
        (receiver.requests_to("/hook").len() >= JOBS / 2).then_some(())
    })
    .await;
    let pid = instances[1].child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let stopped = tokio::time::timeout(Duration::from_secs(10), instances[1].child.wait()).await.unwrap().unwrap();
    assert!(stopped.success());
    instances[1] = start(&args(&listens[1])).await;

    let acked = registering.await.unwrap();
    assert_eq!(acked.len(), JOBS);
    let delivered = all_delivered(&receiver, &acked).await;
    let took_over_in = killed_at.elapsed();
    for (job, ids) in &delivered {
        assert!(ids.iter().all(|id| *id == ids[0]), "job {job} was delivered under several webhook-ids: {ids:?}");
    }
    let requests = receiver.requests_to("/hook").len();
    let polls = upstream.total_polls();
    eprintln!(
        "cluster: {JOBS} jobs over 3 instances, one killed, one restarted: 0 lost, {} repeated callbacks, {polls} polls ({:.2} per job, {} without failover), max concurrent polls of one job {}, everything delivered {took_over_in:?} after the kill",
        requests - JOBS,
        polls as f64 / JOBS as f64,
        PENDING + 1,
        upstream.max_overlap()
    );
    assert_eq!(upstream.max_overlap(), 1, "a job was polled by two instances at once");
    // A failover may repeat the poll that was in flight, no more.
    assert!(polls <= JOBS as u64 * (PENDING + 1) + JOBS as u64 / 10, "{polls} polls");
    for running in &mut instances {
        let _ = running.child.start_kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_reconnect_after_their_connections_are_killed_and_lose_nothing() {
    if skip_on_sqlite() {
        return;
    }
    const JOBS: usize = 500;
    let upstream = MockUpstream::start(&mock_args(3)).await.unwrap();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    // A name of their own on their connections, so only theirs are killed.
    let tag = format!("jh_conn_{}", uuid::Uuid::new_v4().simple());
    let db_url = format!("{}&application_name={tag}", fresh_db_url(dir.path()).await);
    let listens: Vec<String> = (0..2).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let mut instances = Vec::new();
    for listen in &listens {
        let mut args = args_on(listen, &db_url, &upstream.url());
        args.extend(["--lease-ttl".into(), "2s".into(), "--poll-interval".into(), "100ms".into()]);
        instances.push(start(&args).await);
    }
    let jobs: Vec<String> = (0..JOBS).map(|_| new_job()).collect();
    let registering = register_all(jobs, listens.clone(), receiver.url("/hook"));

    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&postgres_url()).await.unwrap();
    for round in 1..=3 {
        eventually(Duration::from_secs(60), &format!("{} deliveries", JOBS * round / 4), || async {
            (receiver.requests_to("/hook").len() >= JOBS * round / 4).then_some(())
        })
        .await;
        let killed: Vec<(bool,)> =
            sqlx::query_as("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1")
                .bind(&tag)
                .fetch_all(&mut admin)
                .await
                .unwrap();
        assert!(!killed.is_empty(), "the instances' connections were found");
    }
    let acked = registering.await.unwrap();
    assert_eq!(acked.len(), JOBS);
    let delivered = all_delivered(&receiver, &acked).await;
    for (job, ids) in &delivered {
        assert!(ids.iter().all(|id| *id == ids[0]), "job {job}: {ids:?}");
    }
    for running in &mut instances {
        assert!(running.child.try_wait().unwrap().is_none(), "an instance died when its connections were killed");
        let _ = running.child.start_kill();
    }
    eprintln!(
        "connection loss: {JOBS} jobs, connections killed 3 times, 0 lost, {} repeated callbacks",
        receiver.requests_to("/hook").len() - JOBS
    );
}

/// A clean rebalance (an instance joins, another is stopped with SIGTERM) hands partitions over without
/// overlap: the old owner's polls end before the new owner's start, and a delivery attempt's claim keeps
/// the new owner from sending what the old one is sending. So no callback is repeated at all. The
/// receiver takes 300 ms to answer, so many attempts are on the wire whenever partitions move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_rebalance_repeats_no_callback() {
    if skip_on_sqlite() {
        return;
    }
    const JOBS: usize = 2_000;
    const PENDING: u64 = 3;
    let upstream = MockUpstream::start(&mock_args(PENDING as u32)).await.unwrap();
    let receiver = SlowReceiver::start(Duration::from_millis(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let db_url = fresh_db_url(dir.path()).await;
    let listens: Vec<String> = (0..4).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let args = |listen: &str| {
        let mut args = args_on(listen, &db_url, &upstream.url());
        args.extend(["--lease-ttl".into(), "2s".into(), "--poll-interval".into(), "100ms".into()]);
        args
    };
    let mut instances: Vec<Running> = Vec::new();
    for listen in &listens[..3] {
        instances.push(start(&args(listen)).await);
    }
    let jobs: Vec<String> = (0..JOBS).map(|_| new_job()).collect();
    // Registrations go to the three first instances only: the one stopped later must not be needed.
    let registering = register_all(jobs, listens[..3].to_vec(), receiver.url.clone());

    eventually(Duration::from_secs(60), "a quarter of the deliveries", || async {
        (receiver.count() >= JOBS / 4).then_some(())
    })
    .await;
    // A fourth instance joins: every instance gives up partitions to it.
    instances.push(start(&args(&listens[3])).await);
    eventually(Duration::from_secs(60), "half of the deliveries", || async {
        (receiver.count() >= JOBS / 2).then_some(())
    })
    .await;
    // The joiner leaves cleanly: its partitions go back to the others.
    let pid = instances[3].child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let stopped = tokio::time::timeout(Duration::from_secs(10), instances[3].child.wait()).await.unwrap().unwrap();
    assert!(stopped.success());

    let acked = registering.await.unwrap();
    assert_eq!(acked.len(), JOBS);
    let by_job = eventually(Duration::from_secs(120), "every acknowledged job to be delivered", || async {
        let by_job = receiver.by_job();
        acked.iter().all(|job| by_job.contains_key(job)).then_some(by_job)
    })
    .await;
    let repeated: Vec<_> = by_job.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "rebalance: {JOBS} jobs, an instance joined then left: {} repeated callbacks, {} polls, max concurrent polls of one job {}",
        repeated.len(),
        upstream.total_polls(),
        upstream.max_overlap()
    );
    assert!(repeated.is_empty(), "a clean rebalance repeated callbacks: {repeated:?}");
    assert_eq!(upstream.max_overlap(), 1, "a job was polled by two instances at once");
    for running in &mut instances[..3] {
        let _ = running.child.start_kill();
    }
}

/// A receiver that answers 204 after `delay`, counting the callbacks of each job.
struct SlowReceiver {
    url: String,
    seen: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

impl SlowReceiver {
    async fn start(delay: Duration) -> SlowReceiver {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let counted = seen.clone();
        let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
            let seen = counted.clone();
            async move {
                let job: serde_json::Value = serde_json::from_slice(&body).unwrap();
                *seen.lock().unwrap().entry(job["job_id"].as_str().unwrap().to_owned()).or_insert(0) += 1;
                tokio::time::sleep(delay).await;
                axum::http::StatusCode::NO_CONTENT
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        SlowReceiver { url, seen }
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().values().sum()
    }

    fn by_job(&self) -> std::collections::HashMap<String, usize> {
        self.seen.lock().unwrap().clone()
    }
}

/// Every connection an instance has to PostgreSQL goes half open mid-run (a relay between them stops
/// carrying bytes but keeps the sockets open, as after a failover or behind a NAT that forgot them):
/// some write batches are mid-statement, some reads mid-answer, the listener is deaf. The instance's
/// writer lanes and calls must not stay pinned: jobs registered after the cut are acknowledged and
/// delivered within 30 s of it (the write-batch deadline is 15 s, a call's 20 s). The server ends the
/// cut connections' transactions (idle in transaction for 20 s), releasing their locks, and every job
/// acknowledged before the cut is delivered too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_database_connections_do_not_pin_the_work() {
    if skip_on_sqlite() {
        return;
    }
    const JOBS: usize = 600;
    const AFTER: usize = 40;
    let upstream = MockUpstream::start(&mock_args(0)).await.unwrap();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db_url = fresh_db_url(dir.path()).await;
    let server = url::Url::parse(&db_url).unwrap().socket_addrs(|| Some(5432)).unwrap()[0];
    let relay = Blackhole::start(server).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let mut running = start(&args_on(&listen, &relay.url_through(&db_url), &upstream.url())).await;
    let jobs: Vec<String> = (0..JOBS).map(|_| new_job()).collect();
    let registering = register_all(jobs, vec![listen.clone()], receiver.url("/hook"));
    eventually(Duration::from_secs(60), "some deliveries before the cut", || async {
        (receiver.requests_to("/hook").len() >= JOBS / 6).then_some(())
    })
    .await;
    relay.cut();
    let since = Instant::now();
    // New work, on rows no cut connection holds.
    let after: Vec<String> = (0..AFTER).map(|_| new_job()).collect();
    let registering_after = register_all(after, vec![listen.clone()], receiver.url("/after"));
    let resumed = tokio::time::timeout(Duration::from_secs(30), async {
        let acked = registering_after.await.unwrap();
        eventually(Duration::from_secs(30), "the jobs registered after the cut delivered", || async {
            let got: HashSet<String> = receiver
                .requests_to("/after")
                .iter()
                .map(|r| r.json()["job_id"].as_str().unwrap().to_owned())
                .collect();
            acked.iter().all(|job| got.contains(job)).then_some(())
        })
        .await;
        acked
    })
    .await;
    let Ok(acked_after) = resumed else {
        let logs = running.logs();
        panic!(
            "the work did not resume within 30 s of the cut; the instance's last lines:\n{}",
            logs[logs.len().saturating_sub(40)..].join("\n")
        );
    };
    assert_eq!(acked_after.len(), AFTER);
    eprintln!("half-open connections: new work delivered {:?} after the cut", since.elapsed());
    let acked =
        tokio::time::timeout(Duration::from_secs(90), registering).await.expect("every registration answered").unwrap();
    assert_eq!(acked.len(), JOBS);
    all_delivered(&receiver, &acked).await;
    eprintln!("half-open connections: every job delivered {:?} after the cut", since.elapsed());
    let _ = running.child.start_kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_now_reaches_the_instance_that_owns_the_delivery() {
    if skip_on_sqlite() {
        return;
    }
    // Eight jobs: with two instances, the chance that none is owned by the one not asked is 1/256.
    const JOBS: usize = 8;
    let upstream = MockUpstream::start(&mock_args(0)).await.unwrap();
    let receiver = Receiver::start().await;
    receiver.answer_with(&[500; JOBS]);
    let dir = tempfile::tempdir().unwrap();
    let db_url = fresh_db_url(dir.path()).await;
    let listens: Vec<String> = (0..2).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let mut instances: Vec<Running> = Vec::new();
    for listen in &listens {
        let mut args = args_on(listen, &db_url, &upstream.url());
        args.extend(["--lease-ttl".into(), "2s".into(), "--retry-schedule".into(), "1h".into()]);
        instances.push(start(&args).await);
    }
    // The second instance holds partitions of its own before any job is registered (it joins with
    // none, so its first change of leases is a gain).
    eventually(Duration::from_secs(30), "the second instance to hold partitions", || async {
        instances[1].logs().iter().any(|line| line.contains("leases changed")).then_some(())
    })
    .await;
    let http = reqwest::Client::new();
    let asked = format!("http://{}", listens[0]);
    let mut ids = Vec::new();
    for _ in 0..JOBS {
        let body = serde_json::json!({"job_id": new_job(), "callback_url": receiver.url("/hook")});
        let response =
            http.post(format!("{asked}/v1/subscriptions")).bearer_auth(KEY_A).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 201);
        let created: serde_json::Value = response.json().await.unwrap();
        ids.push(created["id"].as_str().unwrap().to_owned());
    }
    receiver.wait_for("/hook", JOBS).await;
    for id in &ids {
        eventually(Duration::from_secs(15), "the failed attempt is recorded", || async {
            let sub = json_as_a(http.get(format!("{asked}/v1/subscriptions/{id}"))).await;
            (sub["attempts"] == 1).then_some(())
        })
        .await;
    }
    for id in &ids {
        let response =
            http.post(format!("{asked}/v1/subscriptions/{id}/redeliver")).bearer_auth(KEY_A).send().await.unwrap();
        assert_eq!(response.status(), 202);
    }
    // Within seconds: without the notice, the owner would find them only when its leases next change
    // (about 8 s here) or at the retry an hour away.
    let got = eventually(Duration::from_secs(4), "every retry, now", || async {
        let got = receiver.requests_to("/hook");
        (got.len() >= 2 * JOBS).then_some(got)
    })
    .await;
    let mut by_id: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for request in &got {
        *by_id.entry(request.header("webhook-id").to_owned()).or_default() += 1;
    }
    assert_eq!(by_id.len(), JOBS);
    assert!(by_id.values().all(|n| *n == 2), "each delivery twice under one webhook-id: {by_id:?}");
    for running in &mut instances {
        let _ = running.child.start_kill();
    }
}
