//! kill -9 at random moments, and SIGTERM: nothing acknowledged is lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use jobhook::mock_upstream::MockUpstream;
use serde_json::json;

use crate::support::binary::{all_delivered, args_on, free_port, limit_file_size, register_all, start};
use crate::support::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_and_restart_every_acknowledged_job_is_delivered_under_one_webhook_id() {
    const JOBS: usize = 2_000;
    const KILLS: usize = 4;
    let upstream = MockUpstream::start(&mock_args(3)).await.unwrap();
    let receiver = Receiver::start().await;
    // Some attempts fail, so retries are in flight when the process dies (three at most, so that even
    // one unlucky job that gets all three is still delivered within its schedule).
    receiver.answer_with(&[500, 503, 500]);
    let dir = tempfile::tempdir().unwrap();
    let db_url = fresh_db_url(dir.path()).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let args = args_on(&listen, &db_url, &upstream.url());
    let mut running = start(&args).await;

    // Registrations run throughout, retrying across crashes until each is acknowledged.
    let jobs: Vec<String> = (0..JOBS).map(|_| new_job()).collect();
    let registering = register_all(jobs, vec![listen.clone()], receiver.url("/hook"));

    // Crashes at random moments: each once a random further share of the deliveries has arrived, so the
    // kill lands among registrations, polls, deliveries and retries.
    let mut targets: Vec<usize> = (0..KILLS).map(|_| rand::random_range(JOBS / 20..JOBS * 4 / 5)).collect();
    targets.sort();
    for (round, target) in targets.into_iter().enumerate() {
        eventually(Duration::from_secs(120), &format!("{target} deliveries before crash {round}"), || async {
            (receiver.requests_to("/hook").len() >= target).then_some(())
        })
        .await;
        running.child.start_kill().unwrap();
        running.child.wait().await.unwrap();
        running = start(&args).await;
    }
    let acked = registering.await.unwrap();
    assert_eq!(acked.len(), JOBS);

    let delivered = all_delivered(&receiver, &acked).await;
    for (job, ids) in &delivered {
        assert!(ids.iter().all(|id| *id == ids[0]), "job {job} was delivered under several webhook-ids: {ids:?}");
    }
    let requests = receiver.requests_to("/hook").len();
    let repeats = requests - JOBS - 3;
    eprintln!(
        "crash test: {JOBS} jobs, {KILLS} kills, 0 lost, {requests} callback requests = {JOBS} + 3 scripted failures + {repeats} repeats caused by the kills"
    );

    // The store reopened cleanly and agrees: every subscription ends delivered.
    let http = reqwest::Client::new();
    let app = format!("http://{listen}");
    eventually(Duration::from_secs(30), "every subscription to be delivered", || async {
        let mut delivered = 0;
        let mut cursor = String::new();
        loop {
            let url = format!("{app}/v1/subscriptions?state=delivered&limit=500{cursor}");
            let page: serde_json::Value = http.get(url).bearer_auth(KEY_A).send().await.ok()?.json().await.ok()?;
            delivered += page["items"].as_array()?.len();
            match page["next_cursor"].as_str() {
                Some(next) => cursor = format!("&cursor={next}"),
                None => break,
            }
        }
        (delivered == JOBS).then_some(())
    })
    .await;
    running.child.start_kill().unwrap();
}

#[tokio::test]
async fn sigterm_stops_the_service_gracefully_and_it_resumes_on_the_next_start() {
    let upstream = MockUpstream::start(&jobhook::mock_upstream::MockArgs {
        outcome: jobhook::mock_upstream::Outcome::Pending,
        ..mock_args(0)
    })
    .await
    .unwrap();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db_url = fresh_db_url(dir.path()).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let args = args_on(&listen, &db_url, &upstream.url());
    let mut running = start(&args).await;
    let http = reqwest::Client::new();
    let job = new_job();
    let response = http
        .post(format!("http://{listen}/v1/subscriptions"))
        .bearer_auth(KEY_A)
        .json(&json!({ "job_id": job, "callback_url": receiver.url("/hook") }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let job_id: jobhook::domain::JobId = job.parse().unwrap();
    eventually(Duration::from_secs(5), "the job to be polled", || async {
        (upstream.polls(job_id.clone()).count >= 1).then_some(())
    })
    .await;

    let pid = running.child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(10), running.child.wait())
        .await
        .expect("exits within the grace period")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");

    // The job ends while we are down; the next start resumes polling and delivers.
    upstream.script(job_id.clone(), vec![jobhook::mock_upstream::Answer::Succeed]);
    let mut running = start(&args).await;
    let got = receiver.wait_for("/hook", 1).await;
    got[0].verify(SECRET).unwrap();
    running.child.start_kill().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_503_without_losing_anything_and_recovers() {
    if on_postgres() {
        // The file-size limit fills the embedded store's disk; PostgreSQL's disk is the server's.
        eprintln!("skipped on PostgreSQL: this test fills the SQLite file's disk");
        return;
    }
    let upstream = MockUpstream::start(&mock_args(1)).await.unwrap();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db_url = fresh_db_url(dir.path()).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let mut running = start(&args_on(&listen, &db_url, &upstream.url())).await;
    let http = reqwest::Client::new();
    let register = |job: String| {
        let (http, listen, callback) = (http.clone(), listen.clone(), receiver.url("/hook"));
        async move {
            http.post(format!("http://{listen}/v1/subscriptions"))
                .bearer_auth(KEY_A)
                .json(&json!({ "job_id": job, "callback_url": callback }))
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(register(new_job()).await.status(), 201);

    // No file may grow past one byte: every write of the store fails, as on a full disk.
    limit_file_size(&running, "1");
    let refused = register(new_job()).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["content-type"], "application/problem+json");
    assert!(refused.headers().contains_key("retry-after"));
    let body = refused.text().await.unwrap();
    assert!(body.contains("nothing was saved"), "{body}");
    assert!(running.child.try_wait().unwrap().is_none(), "the process survives a full disk");
    assert!(running.logs().iter().any(|l| l.contains("ERROR") && l.contains("store unavailable")), "a loud log line");
    // A load balancer reading /readyz sends new work elsewhere meanwhile.
    let ready = http.get(format!("http://{listen}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let ready: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(ready["status"], "not ready");
    assert_ne!(ready["checks"]["store"], "ok", "{ready}");
    assert_eq!(ready["checks"]["poller"], "ok", "{ready}");

    limit_file_size(&running, "unlimited");
    let job = new_job();
    assert_eq!(register(job.clone()).await.status(), 201);
    let ready = http.get(format!("http://{listen}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "ready again once writes go through: {:?}", ready.text().await);
    let got = eventually(Duration::from_secs(20), "both accepted jobs to be delivered", || async {
        let got = receiver.requests_to("/hook");
        (got.len() >= 2).then_some(got)
    })
    .await;
    assert!(got.iter().any(|r| r.json()["job_id"] == job.as_str()));
    running.child.start_kill().unwrap();
}

/// The receiver has answered 200, but the store cannot record it (a full disk): the answer is kept and
/// only its record is retried. The receiver must not hear the same delivery again every few seconds
/// for as long as the outage lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_cannot_be_recorded_is_not_sent_again_while_the_disk_is_full() {
    if on_postgres() {
        eprintln!("skipped on PostgreSQL: this test fills the SQLite file's disk");
        return;
    }
    let upstream = MockUpstream::start(&mock_args(0)).await.unwrap();
    // The first attempt fails at once; the second is answered 200 after 1.5 s, so the disk can fill
    // while it is on the wire (after its claim was written, before its outcome is).
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let receiver = axum::Router::new().fallback(move || {
        let calls = counted.clone();
        async move {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
            }
            tokio::time::sleep(Duration::from_millis(1500)).await;
            axum::http::StatusCode::OK
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await });
    let dir = tempfile::tempdir().unwrap();
    let db_url = fresh_db_url(dir.path()).await;
    let mut args = args_on("127.0.0.1:0", &db_url, &upstream.url());
    let at = args.iter().position(|a| a == "--retry-schedule").unwrap();
    args[at + 1] = "1s".to_owned();
    let mut running = start(&args).await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", running.addr);
    let sub = json_as_a(
        http.post(format!("{base}/v1/subscriptions")).json(&json!({ "job_id": new_job(), "callback_url": hook })),
    )
    .await;
    eventually(Duration::from_secs(10), "the second attempt to be on the wire", || async {
        (calls.load(Ordering::SeqCst) >= 2).then_some(())
    })
    .await;
    limit_file_size(&running, "1");
    // Longer than the old 5 s re-send delay, and than the first record retry.
    let outage = Instant::now();
    eventually(Duration::from_secs(10), "the failed record to be logged", || async {
        running.logs().iter().any(|l| l.contains("could not record a delivery attempt")).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(7).saturating_sub(outage.elapsed())).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "a delivery the receiver accepted was sent again");

    limit_file_size(&running, "unlimited");
    let done = eventually(Duration::from_secs(90), "the kept answer to be recorded", || async {
        let sub = json_as_a(http.get(format!("{base}/v1/subscriptions/{}", sub["id"].as_str().unwrap()))).await;
        (sub["state"] == "delivered").then_some(sub)
    })
    .await;
    assert_eq!(done["attempts"], 2, "{done}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    running.child.start_kill().unwrap();
}

/// One `jobhook serve` per SQLite file: a second one is refused with a line saying why (both would
/// resume the same work and send it twice). The lock dies with the process, even with kill -9.
#[tokio::test]
async fn a_second_service_on_the_same_sqlite_file_is_refused() {
    if on_postgres() {
        eprintln!("skipped on PostgreSQL: several instances share a PostgreSQL database by design");
        return;
    }
    let upstream = MockUpstream::start(&mock_args(0)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db_url = fresh_db_url(dir.path()).await;
    let args = args_on("127.0.0.1:0", &db_url, &upstream.url());
    let mut first = start(&args).await;
    let second = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobhook")).args(&args[1..]).output().await.unwrap();
    assert!(!second.status.success());
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(said.contains("another jobhook is already serving") && said.contains("PostgreSQL"), "{said}");
    // The CLI still works on the file the service holds.
    let listed = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args(["keys", "list", "--database-url", &db_url])
        .output()
        .await
        .unwrap();
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));

    first.child.kill().await.unwrap();
    let after = start(&args).await;
    assert!(reqwest::get(format!("http://{}/healthz", after.addr)).await.unwrap().status().is_success());
}

/// A rolling upgrade: a newer jobhook has migrated the database further, and an instance of this one
/// restarts on it. Migrations only add, so it must start rather than refuse a migration it does not
/// know.
#[tokio::test]
async fn a_database_migrated_by_a_newer_version_still_opens() {
    let dir = tempfile::tempdir().unwrap();
    let db_url = fresh_db_url(dir.path()).await;
    drop(jobhook::store::open(&db_url).await.unwrap());
    let insert = "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
                  VALUES (99990101, 'from a newer jobhook', TRUE, $1, 0)";
    if on_postgres() {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db_url).await.unwrap();
        sqlx::query(insert).bind(vec![0u8; 48]).execute(&mut conn).await.unwrap();
    } else {
        let file = jobhook::store::sqlite_file(&db_url).unwrap();
        let conn = rusqlite::Connection::open(file).unwrap();
        conn.execute(&insert.replace("$1", "?1"), [vec![0u8; 48]]).unwrap();
    }
    let store = jobhook::store::open(&db_url).await;
    assert!(store.is_ok(), "{:?}", store.err());
}
